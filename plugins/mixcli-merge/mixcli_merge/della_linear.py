"""della_linear (arXiv 2406.11617): magnitude-ranked random pruning, then a weighted sum."""

from __future__ import annotations

import dataclasses

from mixcli import MergeMethod, param
from mixcli.seeding import generator

from . import della, sparsify
from .generalized import TaskArithmeticParams, merge_task_vectors, per_model


@dataclasses.dataclass
class Params(TaskArithmeticParams):
    rescale: bool = param(True, help="rescale pruned task vectors to their original L1 norm")
    epsilon: float = param(0.15, help="keep probabilities span density +- epsilon by rank",
                           per_model=True, min=0.0)


def della_linear(tensors, base, *, weight, seed, density=1.0, epsilon=0.15, lambda_=1.0,
                 normalize=False, rescale=True, int8_mask=False, out=None):
    """DELLA pruning (per-row, magnitude-ranked keep probabilities) then the weighted sum.

    Same validity rules and length-1-row treatment as ``della``.
    """
    n = len(tensors)
    densities, epsilons = per_model(density, n, "density"), per_model(epsilon, n, "epsilon")
    return merge_task_vectors(
        tensors, base, weight=weight, lambda_=lambda_, normalize=normalize, consensus=False,
        sparsify=lambda i, d: sparsify.della(d, densities[i], epsilons[i], generator(seed, i),
                                             rescale), out=out)


METHOD = MergeMethod(
    name="della_linear",
    summary="DELLA pruning (magnitude-ranked random drop), then task arithmetic",
    merge=della_linear,
    params=Params,
    base="required",
    min_inputs=1,
    random=True,
    check=della.check,
    accepts_out=True,
)
