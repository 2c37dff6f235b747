"""breadcrumbs (arXiv 2312.06795): drop the smallest and the largest (outlier) entries."""

from __future__ import annotations

import dataclasses

from mixcli import MergeMethod, param

from . import sparsify
from .generalized import TaskArithmeticParams, merge_task_vectors, per_model


@dataclasses.dataclass
class Params(TaskArithmeticParams):
    gamma: float = param(0.01, help="fraction of largest-magnitude entries dropped as outliers",
                         per_model=True, min=0.0, max=1.0)


def breadcrumbs(tensors, base, *, weight, density=1.0, gamma=0.01, lambda_=1.0,
                normalize=False, rescale=False, int8_mask=False, out=None):
    """Model breadcrumbs: keep the ``density`` fraction just below the top ``gamma`` fraction
    of each task vector by magnitude, then add the weighted sum to the base."""
    n = len(tensors)
    densities, gammas = per_model(density, n, "density"), per_model(gamma, n, "gamma")
    return merge_task_vectors(
        tensors, base, weight=weight, lambda_=lambda_, normalize=normalize, consensus=False,
        # rescaling needs whole-tensor L1 norms, so it prunes eagerly; otherwise lazily by chunk
        sparsify=(lambda i, d: sparsify.magnitude_outliers(d, densities[i], gammas[i], True))
        if rescale else None,
        select=None if rescale else (
            lambda i, src: sparsify.outlier_selection(src, densities[i], gammas[i])), out=out)


METHOD = MergeMethod(
    name="breadcrumbs",
    summary="Model breadcrumbs: drop small and outlier task-vector entries, then add",
    merge=breadcrumbs,
    params=Params,
    base="required",
    min_inputs=1,
    accepts_out=True,
)
