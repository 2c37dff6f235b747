"""iso_c, Iso-C (arXiv 2502.04959): the task-arithmetic sum with its spectrum made flat,
``σ̄ · U Vᵀ`` (σ̄ the mean singular value). Other tensors take the mean task vector."""

from __future__ import annotations

import dataclasses

from mixcli import MergeMethod, param
from mixcli.svd import kept, thin_svd

from ._singular import (decompose_param, exclude_keys_param, finish, is_matrix, mean_merged, written, task_vectors,
                        working_memory)
from ._torch import torch


@dataclasses.dataclass
class Params:
    scaling_factor: float = param(1.0, help="scale of the merged task vector (FusionBench's docs use 1.5)")
    exclude_keys: list[str] = exclude_keys_param()
    decompose: bool = decompose_param()


def iso_c_delta(total):
    """``mean(σ) · U Vᵀ`` over the components of ``total`` that are not numerically zero."""
    u, s, vh = kept(*thin_svd(total))
    if s.numel() == 0:
        return torch.zeros_like(total)
    return s.mean() * (u @ vh)


def iso_c(tensors, base, *, scaling_factor=1.0, exclude_keys=(), decompose=True, name=None, out=None):
    if not is_matrix(base, name, exclude_keys, decompose):
        return mean_merged(tensors, base, scaling_factor, out=out)
    taus = task_vectors(tensors, base)
    total = taus.pop(0)  # summed in place: the task vectors go as they are added
    while taus:
        total += taus.pop(0)
    return written(finish(base, iso_c_delta(total), scaling_factor), out)


METHOD = MergeMethod(
    name="iso_c",
    summary="Iso-C: the summed task vector with a flat (isotropic) spectrum",
    merge=iso_c,
    params=Params,
    base="required",
    min_inputs=1,
    wants_name=True,
    accepts_out=True,
    linear_algebra=True,
    working_memory=lambda shape, inputs: working_memory(shape, inputs, 1),
)
