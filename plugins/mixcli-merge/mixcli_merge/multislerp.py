"""multislerp: weighted "spherical" average of any number of models (mergekit 0.1.5).

The tangent-space step of mergekit's formulation cancels exactly (projecting the weighted mean
onto its own tangent space gives zero), so the result is the normalised weighted mean of the
unit directions scaled by the weighted mean norm. The steps are kept as written, rounding
residue included, so outputs agree with mergekit bit for bit.
"""

from __future__ import annotations

import dataclasses

from mixcli import MergeMethod, MixcliError, param

from ._torch import torch
from .generalized import per_model


@dataclasses.dataclass
class Params:
    weight: float = param(help="this model's weight", per_model=True)
    normalize_weights: bool = param(True, help="divide the weights by their sum")
    eps: float = param(1e-8, help="added to norms before dividing by them", min=0.0, min_exclusive=True)


def multislerp(tensors, base=None, *, weight, normalize_weights=True, eps=1e-8):
    """``normalize(Σ w_i u_i) · Σ w_i ‖v_i‖`` with ``v_i = X_i - base`` (or ``X_i``) flattened and
    ``u_i = v_i / (‖v_i‖ + eps)``; ``+ base`` with a base. One model is returned as is.

    Works in the input dtype (weights are rounded to it). When the weighted mean direction
    vanishes, two models fall back to ``w_1 v_1 + w_2 v_2``; more raise MixcliError.
    """
    if not tensors[0].is_floating_point():
        raise MixcliError("multislerp needs floating-point tensors")
    weights_list = per_model(weight, len(tensors), "weight")
    if len(tensors) == 1:
        return tensors[0]
    shape, dtype = tensors[0].shape, tensors[0].dtype
    stacked = torch.stack(tensors, dim=0)
    if base is not None:
        stacked.sub_(base)
    flat = stacked.view(len(tensors), -1)
    weights = torch.tensor(weights_list, dtype=dtype)
    if normalize_weights:
        if float(weights.sum()) == 0.0:
            raise MixcliError("multislerp: the weights sum to zero, so they cannot be normalized; "
                              "change the weights or set normalize_weights = false")
        weights = weights / weights.sum()
    column = weights.view(-1, 1)
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat.div_(norms + eps)  # the deltas are not needed again: reuse their storage
    mean = (units * column).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if len(tensors) == 2:
            deltas = [x - base for x in tensors] if base is not None else tensors
            result = (deltas[0] * weights[0] + deltas[1] * weights[1]).view(shape)
            return result if base is None else result + base
        raise MixcliError("multislerp: the weighted mean direction of the models is zero (opposite "
                          "models with balancing weights); change the weights")
    mean = mean / mean_norm
    dots = (units * mean).sum(-1, keepdim=True)
    tangent = (units.sub_(dots * mean) * column).sum(0)
    del units, stacked, flat
    tangent_norm = torch.norm(tangent) + eps
    result = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)
    result = (result * (norms.squeeze(-1) * weights).sum()).view(shape)
    return result if base is None else result + base


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
)
