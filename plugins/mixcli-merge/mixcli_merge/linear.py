"""linear (model soup, arXiv 2203.05482): weighted average of all inputs."""

from __future__ import annotations

import dataclasses

from mixcli import MergeMethod, MixcliError, param

from ._torch import torch
from .generalized import per_model
from .sparsify import CHUNK, chunks


@dataclasses.dataclass
class Params:
    weight: float = param(help="this model's weight in the weighted sum", per_model=True)
    normalize: bool = param(True, help="divide the weighted sum by the sum of the weights")


def linear(tensors, base=None, *, weight, normalize=True, out=None):
    """``sum_i w_i X_i / sum_i w_i`` (no division without ``normalize``).

    Accumulates ``w_i * X_i`` in float32 (float64 for float64 inputs) in input order, as
    mergekit 0.1.5 (product rounded, then added), and returns the input dtype. Raises
    MixcliError when normalizing weights that sum to zero.
    """
    first = tensors[0]
    if not first.is_floating_point():
        raise MixcliError("linear needs floating-point tensors")
    acc = torch.float64 if first.dtype == torch.float64 else torch.float32
    weights = torch.tensor(per_model(weight, len(tensors), "weight"), dtype=acc)
    total = weights.sum()
    if normalize and float(total) == 0.0:
        raise MixcliError("linear: the weights sum to zero, so they cannot be normalized; "
                          "change the weights or set normalize = false")
    coefficients = list(weights.unbind())
    flats = [t.reshape(-1) for t in tensors]
    if out is None:
        out = torch.empty(first.shape, dtype=first.dtype)
    flat_out = out.view(-1)
    # two chunk buffers reused throughout: a fresh allocation per chunk, and the implicit
    # float32 copy that a mixed-dtype addcmul_ makes, cost as much as the arithmetic
    # (inputs already in the accumulation dtype need no copy)
    part_buffer = torch.empty(min(CHUNK, flat_out.numel()), dtype=acc)
    wide_buffer = torch.empty_like(part_buffer)
    for a, b in chunks(flat_out.numel()):
        part, wide = part_buffer[:b - a], wide_buffer[:b - a]
        part.zero_()
        for x, c in zip(flats, coefficients):
            part.addcmul_(x[a:b] if x.dtype == acc else wide.copy_(x[a:b]), c)
        if normalize:
            part.div_(total)
        flat_out[a:b].copy_(part)
    return out


def check(*, weight, normalize=True):
    """At planning time: weights that sum to zero cannot be normalized (mergekit writes NaN)."""
    if normalize and sum(weight) == 0.0:
        raise MixcliError("linear: the weights sum to zero, so they cannot be normalized; "
                          "change the weights or set normalize = false")


METHOD = MergeMethod(
    name="linear",
    summary="Weighted average of the models (model soup)",
    merge=linear,
    params=Params,
    base="ignored",
    min_inputs=1,
    check=check,
    accepts_out=True,
)
