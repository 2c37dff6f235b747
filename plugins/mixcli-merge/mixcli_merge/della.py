"""della (arXiv 2406.11617): magnitude-ranked random pruning with TIES sign election."""

from __future__ import annotations

import dataclasses

from mixcli import MergeMethod, MixcliError, param
from mixcli.seeding import generator

from . import sparsify
from .generalized import TaskArithmeticParams, merge_task_vectors, per_model


@dataclasses.dataclass
class Params(TaskArithmeticParams):
    normalize: bool = param(True, help="divide by the sum of the weights that agree in sign")
    rescale: bool = param(True, help="rescale pruned task vectors to their original L1 norm")
    epsilon: float = param(0.15, help="keep probabilities span density +- epsilon by rank",
                           per_model=True, min=0.0)


def della(tensors, base, *, weight, seed, density=1.0, epsilon=0.15, lambda_=1.0,
          normalize=True, rescale=True, int8_mask=False, out=None):
    """DELLA: per row, keep entries at random with probability rising with magnitude rank
    (``density - epsilon`` .. ``density + epsilon``), then elect signs and average.

    Raises MixcliError unless ``0 < density - epsilon`` and ``density + epsilon < 1`` (for
    density < 1). Tensors whose rows have length 1 cannot be ranked; their task vectors are
    kept unpruned (mergekit fails on them).
    """
    n = len(tensors)
    densities, epsilons = per_model(density, n, "density"), per_model(epsilon, n, "epsilon")
    return merge_task_vectors(
        tensors, base, weight=weight, lambda_=lambda_, normalize=normalize, consensus=True,
        sparsify=lambda i, d: sparsify.della(d, densities[i], epsilons[i], generator(seed, i),
                                             rescale), out=out)


def check(*, density, epsilon, **_):
    """At planning time: the keep probabilities density -+ epsilon must lie inside (0, 1)."""
    for d, e in zip(density, epsilon):
        if 0 < d < 1 and not (d - e > 0 and d + e < 1):
            raise MixcliError(f"della: density {d} and epsilon {e} must satisfy 0 < density - epsilon "
                              "and density + epsilon < 1; lower epsilon or change density")


METHOD = MergeMethod(
    name="della",
    summary="DELLA: magnitude-ranked random pruning with TIES sign election",
    merge=della,
    params=Params,
    base="required",
    min_inputs=1,
    random=True,
    check=check,
    accepts_out=True,
)
