"""dare_ties (arXiv 2311.03099): random (Bernoulli) pruning with TIES sign election."""

from __future__ import annotations

import dataclasses

from mixcli import MergeMethod, param
from mixcli.seeding import generator

from . import sparsify
from .generalized import TaskArithmeticParams, merge_task_vectors, per_model


@dataclasses.dataclass
class Params(TaskArithmeticParams):
    rescale: bool = param(True, help="rescale pruned task vectors to their original L1 norm")


def dare_ties(tensors, base, *, weight, seed, density=1.0, lambda_=1.0, normalize=False,
              rescale=True, int8_mask=False, out=None):
    """DARE-TIES: drop task-vector entries at random (keep probability ``density``), optionally
    restore each vector's L1 norm, then elect signs and sum the agreeing weighted deltas."""
    densities = per_model(density, len(tensors), "density")
    return merge_task_vectors(
        tensors, base, weight=weight, lambda_=lambda_, normalize=normalize, consensus=True,
        select=lambda i, source: sparsify.bernoulli_selection(source, densities[i], generator(seed, i), rescale),
        out=out)


METHOD = MergeMethod(
    name="dare_ties",
    summary="DARE pruning (random drop + rescale) with TIES sign election",
    merge=dare_ties,
    params=Params,
    base="required",
    min_inputs=1,
    random=True,
    accepts_out=True,
)
