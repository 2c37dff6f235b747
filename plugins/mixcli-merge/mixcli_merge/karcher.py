"""karcher: the Riemannian (Karcher) mean of the models' directions, times their mean norm."""

from __future__ import annotations

import dataclasses

from mixcli import MergeMethod, MixcliError, param
from mixcli.safetensors_io import release_pages

from ._torch import torch
from .sparsify import chunks


@dataclasses.dataclass
class Params:
    max_iter: int = param(10, help="most fixed-point iterations (0: the normalised mean direction)", min=0)
    tol: float = param(1e-5, help="stop when the mean tangent is shorter; norms up to it count as zero",
                       min=0.0, min_exclusive=True)


def karcher(tensors, base=None, *, max_iter=10, tol=1e-5, out=None):
    """Equal-weight Karcher mean on the unit sphere of the flattened tensors, scaled by the mean
    of all input norms. One model is returned as is.

    Inputs whose norm is at most ``tol`` have no direction: they are left out of the mean
    (their zero norm still lowers the mean norm); if none is left the result is zero. The
    iteration starts at the normalised mean of the unit vectors (the first input's direction
    if that mean vanishes) and moves along the mean log map until it is shorter than ``tol``.
    Norms are float32 (float64 for float64); the rest is in the input dtype, with mergekit
    0.1.5's operations. Unit vectors are rebuilt from the inputs when needed instead of held,
    in the first bytes of the float32 buffer the norms are taken from (a norm is only taken
    while no unit vector is needed), and for 16-bit inputs the tangent in its last bytes: one
    float32 buffer is all that is held (with the tangent beside it for wider inputs), and the
    pages of a memory-mapped input go again once a pass has read them.
    """
    if not tensors[0].is_floating_point():
        raise MixcliError("karcher needs floating-point tensors")
    if len(tensors) == 1:
        return tensors[0] if out is None else out.copy_(tensors[0])
    n = len(tensors)
    alpha = 1.0 / n
    norm_dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    flats = [x.reshape(-1) for x in tensors]
    scratch = torch.empty(flats[0].numel(), dtype=torch.promote_types(norm_dtype, flats[0].dtype))

    def _norm(x, dtype):
        """``‖x‖`` as mergekit takes it, of ``x`` converted whole to ``dtype`` (here: copied into
        ``scratch``, which overwrites the unit vector held there; so is a tensor that is not
        aligned, e.g. mapped from a file, since torch sums it in another order)."""
        if x.dtype == dtype and _aligned(x):
            return torch.linalg.vector_norm(x)
        return torch.linalg.vector_norm(scratch.copy_(x))

    for x in flats:  # mapped whole by the engine: from here on, at most one at a time
        release_pages(x)
    norms = []
    for x in flats:
        norms.append(_norm(x, norm_dtype))
        release_pages(x)
    valid = [i for i, norm in enumerate(norms) if norm.item() > tol]
    if not valid:
        return torch.zeros_like(tensors[0]) if out is None else out.zero_()
    betas = [alpha / sum(alpha for _ in valid) for _ in valid]
    unit = scratch.view(flats[0].dtype)[:flats[0].numel()]  # one unit vector at a time

    def load_unit(i):
        x, norm = flats[i], norms[i]
        for a, b in chunks(x.numel()):
            unit[a:b] = x[a:b] / norm
            release_pages(x[a:b])
        return unit

    # the result's storage; the dot products over it round as mergekit's only when it is aligned
    in_place = out is not None and _aligned(out)
    mean = out.view(-1).zero_() if in_place else torch.zeros_like(flats[0])
    for beta, i in zip(betas, valid):
        load_unit(i)
        for a, b in chunks(mean.numel()):
            mean[a:b] += beta * unit[a:b]
    mean_norm = _norm(mean, norm_dtype)
    if mean_norm.item() < tol:
        mean.copy_(load_unit(valid[0]))
    else:
        _scale(mean, mean_norm, divide=True)
    size = mean.numel()
    halves = scratch.element_size() == 2 * mean.element_size()  # 16-bit inputs: the tangent fits too
    tangent = scratch.view(mean.dtype)[size:] if halves else torch.empty_like(mean)
    for _ in range(max_iter):
        tangent.zero_()
        for beta, i in zip(betas, valid):
            load_unit(i)
            cos = torch.clamp(torch.dot(mean, unit), -1.0, 1.0)
            theta = torch.arccos(cos)
            if theta.item() < tol:
                continue
            step = beta * (theta / torch.sin(theta))
            for a, b in chunks(mean.numel()):
                tangent[a:b] += step * (unit[a:b] - cos * mean[a:b])
        # the tangent converted whole to the norm dtype: in place, over the whole buffer
        direction = _widen(scratch, tangent) if halves else tangent
        tangent_norm = _norm(direction, norm_dtype)
        if tangent_norm.item() < tol:
            break
        cos_step, sin_step = torch.cos(tangent_norm), torch.sin(tangent_norm)
        for a, b in chunks(size):
            # a 16-bit tensor over a float scalar divides in float and rounds once: as here
            towards = (direction[a:b] / tangent_norm).to(mean.dtype)
            mean[a:b] = cos_step * mean[a:b] + sin_step * towards
        unit_norm = _norm(mean, norm_dtype)
        if unit_norm.item() > tol:
            _scale(mean, unit_norm, divide=True)
    del tangent, unit, scratch
    scale = sum(alpha * norm for norm in norms)
    _scale(mean, scale)
    if out is None:
        return mean.view(tensors[0].shape)
    return out if in_place else out.copy_(mean.view(out.shape))


def _aligned(x) -> bool:
    """Whether torch's vectorised sums over ``x`` round as over a freshly allocated tensor."""
    return x.data_ptr() % 64 == 0


def _widen(buffer, upper):
    """``upper``, the 16-bit second half of ``buffer``'s bytes, converted to ``buffer``'s
    dtype over the whole of ``buffer``, front to back: a chunk's wide bytes end before the
    16-bit entries not yet read (``4b ≤ 2N + 2b`` for entry ``b ≤ N``)."""
    for a, b in chunks(upper.numel()):
        buffer[a:b] = upper[a:b].to(buffer.dtype)  # a copy first: the two ranges may overlap
    return buffer


def _scale(x, factor, divide=False):
    """``x * factor`` (or ``x / factor``) in place, chunk by chunk, rounded to ``x``'s dtype."""
    for a, b in chunks(x.numel()):
        x[a:b] = x[a:b] / factor if divide else factor * x[a:b]
    return x


METHOD = MergeMethod(
    name="karcher",
    summary="Karcher (Riemannian) mean of the models' directions, scaled by their mean norm",
    merge=karcher,
    params=Params,
    base="ignored",
    min_inputs=1,
    accepts_out=True,
)
