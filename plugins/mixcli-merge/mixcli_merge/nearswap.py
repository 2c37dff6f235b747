"""nearswap: move the base toward the other model by at most ``t`` per entry."""

from __future__ import annotations

import dataclasses

from mixcli import MergeMethod, MixcliError, param

from ._torch import torch
from .sparsify import chunks

_GAP_FLOOR = 1e-6  # gaps below this are treated as this (so tiny t moves them proportionally)


@dataclasses.dataclass
class Params:
    t: float = param(help="largest change of any entry of the base (entries closer than t are "
                          "replaced by the other model's)", min=0.0)


def nearswap(tensors, base, *, t, out=None):
    """``w · X + (1 - w) · base`` with ``w = clamp(t / max(|base - X|, 1e-6), 0, 1)``: about
    ``base + clamp(X - base, -t, t)``. Elementwise in the input dtype, chunk by chunk, with
    mergekit 0.1.5's operations."""
    if base is None or len(tensors) != 1:
        raise MixcliError("nearswap needs a base model and exactly one other model")
    if not base.is_floating_point():
        raise MixcliError("nearswap needs floating-point tensors")
    a, b = base.reshape(-1), tensors[0].reshape(-1)
    if out is None:
        out = torch.empty(base.shape, dtype=base.dtype)
    flat_out = out.view(-1)
    for start, stop in chunks(a.numel()):
        x, y = a[start:stop], b[start:stop]
        weight = (t / torch.abs(x - y).clamp(min=_GAP_FLOOR)).clamp(min=0, max=1)
        torch.add(weight * y, (1 - weight) * x, out=flat_out[start:stop])
    return out


METHOD = MergeMethod(
    name="nearswap",
    summary="Move the base toward the other model by at most t per entry",
    merge=nearswap,
    params=Params,
    base="required",
    min_inputs=1,
    max_inputs=1,
    partial_tensors="base_or_skip",
    accepts_out=True,
)
