"""slerp: spherical interpolation between the base and one other model."""

from __future__ import annotations

import dataclasses

from mixcli import MergeMethod, MixcliError, param

from ._torch import torch

_CHUNK = 1 << 20  # mergekit's chunk; the norm is the norm of per-chunk norms
_DOT_THRESHOLD = 0.9995
_EPS = 1e-8


@dataclasses.dataclass
class Params:
    t: float = param(help="interpolation factor: 0 = base model, 1 = the other model",
                     min=0.0, max=1.0, lifted_by="extrapolate")
    extrapolate: bool = param(False, help="allow t outside [0, 1], past either model (mergekit "
                                          "accepts any t without a word)")


def slerp(tensors, base, *, t, extrapolate=False, out=None):
    """Spherical interpolation from ``base`` (t = 0) to ``tensors[0]`` (t = 1).

    Works on the whole flattened tensors in float32 (float64 for float64) with mergekit
    0.1.5's chunking and rounding: norms <= 1e-8 are not normalized, the cosine is clamped to
    [-1, 1], and |cos| > 0.9995 falls back to linear interpolation of the raw tensors.
    Returns the input dtype.
    """
    if base is None or len(tensors) != 1:
        raise MixcliError("slerp needs a base model and exactly one other model")
    v0, v1 = base, tensors[0]
    if not v0.is_floating_point():
        raise MixcliError("slerp needs floating-point tensors")
    dtype = torch.float64 if v0.dtype == torch.float64 else torch.float32
    a, b = v0.reshape(1, -1), v1.reshape(1, -1)
    t = torch.tensor([[t]], dtype=dtype)
    n = a.shape[1]
    if n == 0:
        return v0.clone() if out is None else out
    bounds = [(s, min(s + _CHUNK, n)) for s in range(0, n, _CHUNK)]

    def cast(x, s, e):
        return x[:, s:e].to(dtype)

    # per-chunk results go into preallocated rows: a list of thousands of tiny tensors made
    # between the chunk temporaries fragments the heap, which then holds ~2 bytes per entry
    per_chunk = torch.empty(len(bounds), 1, 1, dtype=dtype)

    def norm(x):
        for row, (s, e) in zip(per_chunk, bounds):
            torch.linalg.vector_norm(cast(x, s, e), dim=1, keepdim=True, out=row)
        total = torch.linalg.vector_norm(per_chunk, dim=0)
        return torch.where(total > _EPS, total, 1)

    norm_a, norm_b = norm(a), norm(b)
    for row, (s, e) in zip(per_chunk, bounds):
        torch.sum((cast(a, s, e) / norm_a) * (cast(b, s, e) / norm_b), dim=1, keepdim=True, out=row)
    dot = per_chunk.sum(dim=0).clamp(-1, 1)
    lerp = dot.abs() > _DOT_THRESHOLD
    theta = torch.acos(torch.where(lerp, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(lerp, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
    coef_b = torch.where(lerp, t, torch.sin(t * theta) / sin_theta)

    result = torch.empty_like(a) if out is None else out.view(1, -1)
    for s, e in bounds:
        result[:, s:e] = coef_a * cast(a, s, e) + coef_b * cast(b, s, e)
    return result.reshape(v0.shape) if out is None else out


METHOD = MergeMethod(
    name="slerp",
    summary="Spherical interpolation between the base and one other model",
    merge=slerp,
    params=Params,
    base="required",
    min_inputs=1,
    max_inputs=1,
    partial_tensors="singleton",
    accepts_out=True,
)
