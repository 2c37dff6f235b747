"""ram (Reinforced Agent Merging, arXiv 2601.13572): a change made by one model is taken whole,
a change made by several is averaged over those models only."""

from __future__ import annotations

import dataclasses

from mixcli import MergeMethod, MixcliError, param

from ._torch import torch
from .sparsify import chunks


@dataclasses.dataclass
class Params:
    epsilon: float = param(1e-5, help="changes |X - base| up to this count as no change", min=0.0)


def ram(tensors, base, *, epsilon=1e-5, out=None):
    """``base + Σ_i a_i τ_i ([c = 1] + [c > 1] / c)`` with ``τ_i = X_i - base``, ``a_i = [|τ_i| > ε]``
    and ``c = Σ_i a_i`` per entry. Works in the input dtype, chunk by chunk, with mergekit 0.1.5's
    operations (task vectors are never held whole)."""
    return combine(tensors, base, epsilon, scales=None, out=out)


def combine(tensors, base, epsilon, scales=None, out=None):
    """The RAM combination; ``scales(active_counts)`` gives a per-model factor (a float32
    column) for the uniquely changed entries, as RAM+ does. ``active_counts`` is a callable
    returning, per model, (#active shared entries, #active unique entries) of the tensor."""
    if base is None:
        raise MixcliError("ram needs a base model")
    if not base.is_floating_point():
        raise MixcliError("ram needs floating-point tensors")
    if not tensors:
        return base if out is None else out.copy_(base)
    flat_base = base.reshape(-1)
    flats = [x.reshape(-1) for x in tensors]

    def masks(a, b):
        deltas = torch.stack([x[a:b] - flat_base[a:b] for x in flats], dim=0)
        active = deltas.abs() > epsilon
        counts = active.sum(dim=0, keepdim=True)
        return deltas, active, counts, counts > 1, counts == 1

    scale = None
    if scales is not None:
        scale = scales(lambda: _counts(flat_base.numel(), masks, len(tensors)))
    # RAM+'s float32 scale promotes the sum to float32 (mergekit returns that); it is rounded
    # to the input dtype here, once, as a cast of mergekit's result would be
    result = torch.empty(base.shape, dtype=base.dtype) if out is None else out
    flat_out = result.view(-1)
    for a, b in chunks(flat_base.numel()):
        deltas, active, counts, shared, unique = masks(a, b)
        kept = deltas * active
        single = kept * unique if scale is None else kept * unique * scale
        merged = (single + kept * shared / counts.clamp(min=1)).sum(dim=0)
        flat_out[a:b] = flat_base[a:b] + merged
    return result


def _counts(n, masks, models):
    """Per model, the number of its active entries that are shared and that are unique."""
    shared = torch.zeros(models, dtype=torch.int64)
    unique = torch.zeros(models, dtype=torch.int64)
    for a, b in chunks(n):
        _, active, _, is_shared, is_unique = masks(a, b)
        shared += (active & is_shared).sum(dim=1)
        unique += (active & is_unique).sum(dim=1)
    return shared, unique


METHOD = MergeMethod(
    name="ram",
    summary="RAM: changes made by one model taken whole, shared changes averaged",
    merge=ram,
    params=Params,
    base="required",
    min_inputs=1,
    accepts_out=True,
)
