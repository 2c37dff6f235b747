"""multislerp: weighted "spherical" average of any number of models (mergekit 0.1.5).

The tangent-space step of mergekit's formulation cancels exactly (projecting the weighted mean
onto its own tangent space gives zero), so the result is the normalised weighted mean of the
unit directions scaled by the weighted mean norm. The steps are kept as written, rounding
residue included, so outputs agree with mergekit bit for bit.
"""

from __future__ import annotations

import dataclasses

from mixcli import MergeMethod, MixcliError, param
from mixcli.safetensors_io import release_pages

from ._torch import torch
from .generalized import per_model
from .sparsify import chunks


@dataclasses.dataclass
class Params:
    weight: float = param(help="this model's weight", per_model=True)
    normalize_weights: bool = param(True, help="divide the weights by their sum")
    eps: float = param(1e-8, help="added to norms before dividing by them", min=0.0, min_exclusive=True)


def multislerp(tensors, base=None, *, weight, normalize_weights=True, eps=1e-8, out=None):
    """``normalize(Σ w_i u_i) · Σ w_i ‖v_i‖`` with ``v_i = X_i - base`` (or ``X_i``) flattened and
    ``u_i = v_i / (‖v_i‖ + eps)``; ``+ base`` with a base. One model is returned as is.

    Works in the input dtype (weights are rounded to it) with mergekit 0.1.5's operations. When
    the weighted mean direction vanishes, two models fall back to ``w_1 v_1 + w_2 v_2``; more
    raise MixcliError. The norms and the dot products with the mean are whole-row reductions,
    so one buffer of all rows is held (first the task vectors, then the products); everything
    else runs chunk by chunk, with unit vectors recomputed from the inputs (whose mapped pages
    go again once a pass has read them).
    """
    if not tensors[0].is_floating_point():
        raise MixcliError("multislerp needs floating-point tensors")
    weights_list = per_model(weight, len(tensors), "weight")
    if len(tensors) == 1:
        return tensors[0] if out is None else out.copy_(tensors[0])
    shape, dtype, n = tensors[0].shape, tensors[0].dtype, len(tensors)
    flats = [x.reshape(-1) for x in tensors]
    flat_base = base.reshape(-1) if base is not None else None
    size = flats[0].numel()
    weights = torch.tensor(weights_list, dtype=dtype)
    if normalize_weights:
        if float(weights.sum()) == 0.0:
            raise MixcliError("multislerp: the weights sum to zero, so they cannot be normalized; "
                              "change the weights or set normalize_weights = false")
        weights = weights / weights.sum()
    column = weights.view(-1, 1)

    def vectors(a, b):
        part = torch.stack([x[a:b] for x in flats], dim=0)
        part = part if flat_base is None else part.sub_(flat_base[a:b])
        for x in flats if flat_base is None else (*flats, flat_base):  # read again on the next pass
            release_pages(x[a:b])
        return part

    for x in flats if flat_base is None else (*flats, flat_base):  # mapped whole by the engine
        release_pages(x)

    rows = torch.empty(n, size, dtype=dtype)
    for a, b in chunks(size):
        rows[:, a:b] = vectors(a, b)
    norms = torch.norm(rows, dim=-1, keepdim=True)
    divisor = norms + eps

    def units(a, b):
        return vectors(a, b).div_(divisor)

    mean = torch.empty(size, dtype=dtype) if out is None else out.view(-1)
    for a, b in chunks(size):
        torch.sum(units(a, b) * column, dim=0, out=mean[a:b])
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if n == 2:  # mergekit's fallback: the weighted sum
            for a, b in chunks(size):
                v = vectors(a, b)
                mean[a:b] = v[0] * weights[0] + v[1] * weights[1]
                if flat_base is not None:
                    mean[a:b] = mean[a:b] + flat_base[a:b]
            return mean.view(shape) if out is None else out
        raise MixcliError("multislerp: the weighted mean direction of the models is zero (opposite "
                          "models with balancing weights); change the weights")
    _divide(mean, mean_norm)
    for a, b in chunks(size):  # rows now holds the products whose row sums are the dots
        torch.mul(units(a, b), mean[a:b], out=rows[:, a:b])
    dots = rows.sum(-1, keepdim=True)
    del rows
    tangent = torch.empty(size, dtype=dtype)
    for a, b in chunks(size):
        torch.sum((units(a, b) - dots * mean[a:b]) * column, dim=0, out=tangent[a:b])
    tangent_norm = torch.norm(tangent) + eps
    cos_step, sin_ratio = torch.cos(tangent_norm), torch.sin(tangent_norm) / tangent_norm
    average_norm = (norms.squeeze(-1) * weights).sum()
    for a, b in chunks(size):
        part = (mean[a:b] * cos_step + tangent[a:b] * sin_ratio) * average_norm
        mean[a:b] = part if flat_base is None else part + flat_base[a:b]
    return mean.view(shape) if out is None else out


def _divide(x, divisor):
    for a, b in chunks(x.numel()):
        x[a:b] = x[a:b] / divisor


def check(*, weight, normalize_weights=True, eps=1e-8):
    """At planning time: weights that sum to zero cannot be normalized (mergekit writes NaN)."""
    if normalize_weights and sum(weight) == 0.0:
        raise MixcliError("multislerp: the weights sum to zero, so they cannot be normalized; "
                          "change the weights or set normalize_weights = false")


METHOD = MergeMethod(
    name="multislerp",
    summary="Spherical-style weighted average of the models' directions and norms",
    merge=multislerp,
    params=Params,
    base="optional",
    min_inputs=1,
    check=check,
    accepts_out=True,
)
