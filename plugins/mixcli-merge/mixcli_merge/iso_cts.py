"""iso_cts, Iso-CTS (arXiv 2502.04959): the top-``c`` common subspace of the summed task
vector plus each task's top-``d`` directions outside it (left side), orthogonalised and given
a flat spectrum. Other tensors take the mean task vector."""

from __future__ import annotations

import dataclasses

from mixcli import MergeMethod, MixcliError, param
from mixcli.svd import kept, thin_svd, truncated_svd

from ._singular import (decompose_param, exclude_keys_param, finish, is_matrix, mean_merged, written, orthogonalised,
                        task_vectors, working_memory)
from ._torch import torch


@dataclasses.dataclass
class Params:
    scaling_factor: float = param(1.0, help="scale of the merged task vector (FusionBench's docs use 1.5)")
    common_space_fraction: float = param(0.8, help="share of the rank given to the common subspace",
                                         min=0.0, max=1.0)
    exclude_keys: list[str] = exclude_keys_param()
    decompose: bool = decompose_param()


def subspace_sizes(rank_bound: int, tasks: int, fraction: float) -> tuple[int, int]:
    """``(c, d)`` with ``T·d + c = r``: FusionBench's integer arithmetic (Python's round, ties
    to even)."""
    c0 = int(rank_bound * fraction)
    c = rank_bound - round((rank_bound - c0) / tasks) * tasks
    return c, (rank_bound - c) // tasks


def iso_cts_delta(taus: list, common: int, per_task: int):
    """``mean(ŝ) · polar(Û) polar(V̂ᵀ)`` over the retained common and task components.
    ``taus`` is emptied and its task vectors overwritten by their residuals (the merge holds
    a few matrices, not each task vector beside its residual)."""
    shape, dtype = taus[0].shape, taus[0].dtype
    total = taus[0].clone()
    for tau in taus[1:]:
        total += tau
    u, s, vh = thin_svd(total)
    del total
    u_c, s_c, vh_c = u[:, :common], s[:common], vh[:common]
    reference = float(s[0]) if s.numel() else 0.0
    blocks = []
    while taus:
        residual = taus.pop(0)
        if per_task:
            residual -= u_c @ (u_c.T @ residual)  # the common left subspace removed
            blocks.append(kept(*truncated_svd(residual, per_task, reference)))
        del residual
    blocks.append(kept(u_c, s_c, vh_c))
    del u, vh, u_c, vh_c
    return orthogonalised(blocks, shape, dtype, flat=True)


def iso_cts(tensors, base, *, scaling_factor=1.0, common_space_fraction=0.8, exclude_keys=(),
            decompose=True, name=None, out=None):
    if not is_matrix(base, name, exclude_keys, decompose):
        return mean_merged(tensors, base, scaling_factor, out=out)
    taus = task_vectors(tensors, base)
    common, per_task = subspace_sizes(min(base.shape), len(taus), common_space_fraction)
    if common < 0:
        raise MixcliError(f"common_space_fraction = {common_space_fraction} leaves a common subspace of "
                          f"{common} for {len(taus)} tasks of rank {min(base.shape)}; use 0.5 or more")
    return written(finish(base, iso_cts_delta(taus, common, per_task), scaling_factor), out)


METHOD = MergeMethod(
    name="iso_cts",
    summary="Iso-CTS: common and task-specific singular subspaces with a flat spectrum",
    merge=iso_cts,
    params=Params,
    base="required",
    min_inputs=1,
    wants_name=True,
    accepts_out=True,
    linear_algebra=True,
    working_memory=lambda shape, inputs: working_memory(shape, inputs, 3),
)
