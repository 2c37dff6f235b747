"""dare_linear (arXiv 2311.03099): random (Bernoulli) pruning, then a weighted sum."""

from __future__ import annotations

import dataclasses

from mixcli import MergeMethod, param
from mixcli.seeding import generator

from . import sparsify
from .generalized import TaskArithmeticParams, merge_task_vectors, per_model


@dataclasses.dataclass
class Params(TaskArithmeticParams):
    rescale: bool = param(True, help="rescale pruned task vectors to their original L1 norm")


def dare_linear(tensors, base, *, weight, seed, density=1.0, lambda_=1.0, normalize=False,
                rescale=True, int8_mask=False, out=None):
    """DARE: drop task-vector entries at random (keep probability ``density``), optionally
    restore each vector's L1 norm, and add the weighted sum to the base."""
    densities = per_model(density, len(tensors), "density")
    return merge_task_vectors(
        tensors, base, weight=weight, lambda_=lambda_, normalize=normalize, consensus=False,
        select=lambda i, source: sparsify.bernoulli_selection(source, densities[i], generator(seed, i), rescale),
        out=out)


METHOD = MergeMethod(
    name="dare_linear",
    summary="DARE pruning (random drop + rescale), then task arithmetic",
    merge=dare_linear,
    params=Params,
    base="required",
    min_inputs=1,
    random=True,
    accepts_out=True,
)
