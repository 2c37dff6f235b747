"""ties (arXiv 2306.01708): magnitude pruning, sign election, disjoint mean."""

from __future__ import annotations

import dataclasses

from mixcli import MergeMethod, param

from . import sparsify
from .generalized import TaskArithmeticParams, merge_task_vectors, per_model


@dataclasses.dataclass
class Params(TaskArithmeticParams):
    normalize: bool = param(True, help="divide by the sum of the weights that agree in sign")


def ties(tensors, base, *, weight, density=1.0, lambda_=1.0, normalize=True, rescale=False,
         int8_mask=False, out=None):
    """TIES: keep each task vector's top ``density`` fraction by magnitude, elect the sign of
    the weighted sum per element, and average the agreeing weighted deltas."""
    densities = per_model(density, len(tensors), "density")
    return merge_task_vectors(
        tensors, base, weight=weight, lambda_=lambda_, normalize=normalize, consensus=True,
        # rescaling needs whole-tensor L1 norms, so it prunes eagerly; otherwise lazily by chunk
        sparsify=(lambda i, d: sparsify.magnitude(d, densities[i], True)) if rescale else None,
        select=None if rescale else (lambda i, src: sparsify.magnitude_selection(src, densities[i])),
        out=out)


METHOD = MergeMethod(
    name="ties",
    summary="TIES: trim small task-vector entries, elect signs, average agreeing entries",
    merge=ties,
    params=Params,
    base="required",
    min_inputs=1,
    accepts_out=True,
)
