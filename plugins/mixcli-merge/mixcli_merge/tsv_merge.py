"""tsv_merge, TSV-M (arXiv 2412.00081): per matrix, each task keeps its top ``int(r/T)``
singular components; the stacked bases are made orthogonal (polar factors) and multiplied
back with the original singular values. Other tensors take the mean task vector."""

from __future__ import annotations

import dataclasses

from mixcli import MergeMethod, param
from mixcli.errors import warn
from mixcli.svd import kept, rank_per_task, truncated_svd, working

from ._singular import (decompose_param, exclude_keys_param, finish, is_matrix, mean_merged, orthogonalised,
                        svd_solver_param, task_vectors, working_memory, written)
from ._torch import torch


@dataclasses.dataclass
class Params:
    alpha: float = param(1.0, help="scale of the merged task vector (FusionBench alpha)")
    weight: float = param(1.0, help="scale of this model's task vector before its SVD (FusionBench's "
                                    "list-valued alpha)", per_model=True)
    exclude_keys: list[str] = exclude_keys_param()
    decompose: bool = decompose_param()
    svd_solver: str = svd_solver_param()


def tsv_delta(taus, k: int, solver: str = "full"):
    """``polar(Û) diag(ŝ) polar(V̂ᵀ)`` from each task vector's top-``k`` components;
    components a task does not have (zero or low rank) are left out, not invented. ``taus``
    is a list, which is emptied, or an iterator: each task vector goes once decomposed, so
    the merge holds one of them, not T."""
    blocks = []
    for tau in ((taus.pop(0) for _ in range(len(taus))) if isinstance(taus, list) else taus):
        shape, dtype = tau.shape, tau.dtype
        blocks.append(kept(*truncated_svd(tau, k, solver=solver)))
        del tau
    return orthogonalised(blocks, shape, dtype, flat=False)


def tsv_merge(tensors, base, *, alpha=1.0, weight=1.0, exclude_keys=(), decompose=True, svd_solver="full", name=None,
              out=None):
    weights = weight if isinstance(weight, (list, tuple)) else [weight] * len(tensors)
    if not is_matrix(base, name, exclude_keys, decompose):
        return mean_merged(tensors, base, alpha, weights, out)
    k = rank_per_task(min(base.shape), len(tensors))
    if k == 0:
        warn(f"tensor '{name}': tsv_merge keeps int({min(base.shape)}/{len(tensors)}) = 0 components per task; "
             "it stays the base")
        zeros = torch.zeros(base.shape, dtype=working(base[:0]).dtype, device=base.device)
        return written(finish(base, zeros, alpha), out)
    taus = (task_vectors([x], base, [w])[0] for x, w in zip(tensors, weights))  # made one at a time
    return written(finish(base, tsv_delta(taus, k, svd_solver), alpha), out)


METHOD = MergeMethod(
    name="tsv_merge",
    summary="TSV-M: per-task top singular vectors, orthogonalised, with their singular values",
    merge=tsv_merge,
    params=Params,
    base="required",
    min_inputs=1,
    wants_name=True,
    accepts_out=True,
    linear_algebra=True,
    working_memory=lambda shape, inputs: working_memory(shape, inputs, 3),
)
