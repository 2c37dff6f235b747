"""nuslerp: spherical interpolation of two models by their weights, with or without a base."""

from __future__ import annotations

import dataclasses

from mixcli import MergeMethod, MixcliError, param

from ._torch import torch
from .generalized import per_model
from .sparsify import chunks

_NORM_FLOOR = 1e-7  # vectors shorter than this normalise to (almost) zero
_COLLINEAR = 1e-16  # 1 - cos^2 at or below this: interpolate linearly


@dataclasses.dataclass
class Params:
    weight: float = param(help="this model's weight; only the ratio of the two matters", per_model=True)
    nuslerp_flatten: bool = param(True, help="one vector per tensor (else one per row or column)")
    nuslerp_row_wise: bool = param(False, help="with nuslerp_flatten = false: interpolate columns "
                                              "(vectors along dimension 0) instead of rows")


def interpolation_factor(weight) -> float:
    """``t = w_2 / (w_1 + w_2)``, or 0.5 when the weights sum to (almost) zero."""
    w1, w2 = per_model(weight, 2, "weight")
    total = w1 + w2
    return 0.5 if abs(total) < 1e-6 else w2 / total


def nuslerp(tensors, base=None, *, weight, nuslerp_flatten=True, nuslerp_row_wise=False, out=None):
    """Spherical interpolation from ``tensors[0]`` (t = 0) to ``tensors[1]`` (t = 1) at
    ``t = w_2 / (w_1 + w_2)``; with a base, of the task vectors ``X_i - base``, added back.

    The raw (not normalised) vectors are combined with ``sin((1-t)θ)/sin θ`` and ``sin(tθ)/sin θ``;
    vectors whose cosine rounds to ±1 are interpolated linearly. Works in the input dtype with
    mergekit 0.1.5's operations, so results agree bit for bit.
    """
    if len(tensors) != 2:
        raise MixcliError("nuslerp needs exactly two models besides the base")
    if not tensors[0].is_floating_point():
        raise MixcliError("nuslerp needs floating-point tensors")
    t = interpolation_factor(weight)
    shape = tensors[0].shape
    if out is None:
        out = torch.empty(shape, dtype=tensors[0].dtype)
    if nuslerp_flatten or tensors[0].dim() == 0:
        _slerp_flat(t, [x.reshape(-1) for x in tensors], None if base is None else base.reshape(-1),
                    out.view(-1))
        return out
    if base is not None:
        v0, v1 = tensors[0] - base, tensors[1] - base
    else:
        v0, v1 = tensors
    if nuslerp_row_wise:  # vectors along dimension 0: swap it with the last
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    result = _slerp_rows(t, v0, v1)
    out.copy_(result.transpose(0, -1) if nuslerp_row_wise else result)
    if base is not None:
        out.add_(base)
    return out


def _coefficients(t: float, cos):
    """(coefficient of v0, coefficient of v1, collinear) for cosines ``cos``."""
    collinear = (1 - cos.square()) <= _COLLINEAR
    theta = torch.acos(torch.where(collinear, 0, cos))
    return torch.sin((1 - t) * theta), torch.sin(t * theta), torch.sin(theta), collinear


def _slerp_flat(t: float, inputs, base, out):
    """One vector per tensor. The norms and the cosine are whole-tensor reductions, computed as
    mergekit computes them on whole tensors; one whole buffer is held at a time (a task vector,
    then the product whose sum is the cosine) and task vectors are recomputed chunk by chunk."""

    def vector(i, a=0, b=None):
        x = inputs[i][a:b]
        return x if base is None else x - base[a:b]

    def norm(i):
        return torch.norm(vector(i), dim=-1, keepdim=True).clamp(min=_NORM_FLOOR)

    n0, n1 = norm(0), norm(1)
    product = torch.empty_like(out)
    for a, b in chunks(out.numel()):
        torch.mul(vector(0, a, b) / n0, vector(1, a, b) / n1, out=product[a:b])
    cos = torch.sum(product, dim=-1, keepdim=True).clamp(-1, 1)
    del product
    s0, s1, sin_theta, collinear = _coefficients(t, cos)
    linear = bool(collinear)
    for a, b in chunks(out.numel()):
        x0, x1 = vector(0, a, b), vector(1, a, b)
        if linear:
            torch.add((1 - t) * x0, t * x1, out=out[a:b])
        else:
            torch.div(s0 * x0 + s1 * x1, sin_theta, out=out[a:b])
        if base is not None:
            out[a:b].add_(base[a:b])
    return out


def _slerp_rows(t: float, v0, v1):
    """One vector per row of the last dimension (rows chosen by the caller's transpose)."""
    u0 = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=_NORM_FLOOR)
    u1 = v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=_NORM_FLOOR)
    cos = torch.sum(u0 * u1, dim=-1, keepdim=True).clamp(-1, 1)
    del u0, u1
    s0, s1, sin_theta, collinear = _coefficients(t, cos)
    spherical = (s0 * v0 + s1 * v1) / sin_theta
    return torch.where(collinear, (1 - t) * v0 + t * v1, spherical)


def check(*, weight, nuslerp_flatten=True, nuslerp_row_wise=False):
    """At planning time: exactly two weights (one per model besides the base)."""
    if isinstance(weight, (list, tuple)) and len(weight) != 2:
        raise MixcliError(f"nuslerp takes exactly two models besides the base, got {len(weight)}")


METHOD = MergeMethod(
    name="nuslerp",
    summary="Spherical interpolation of two models by weight (of task vectors with a base)",
    merge=nuslerp,
    params=Params,
    base="optional",
    min_inputs=2,
    max_inputs=2,
    partial_tensors="singleton",
    check=check,
    accepts_out=True,
)
