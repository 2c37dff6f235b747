"""sce (FuseChat, arXiv 2408.07990): select high-variance entries, weight the task vectors by
their mean square, erase entries against the elected sign."""

from __future__ import annotations

import dataclasses

from mixcli import MergeMethod, MixcliError, param
from mixcli.safetensors_io import release_pages

from ._torch import torch
from .sparsify import chunks

_EQUAL_WEIGHTS_BELOW = 1e-6  # mergekit: a smaller sum of mean squares means equal weights


@dataclasses.dataclass
class Params:
    select_topk: float = param(1.0, help="fraction of the entries with non-zero variance across the "
                                         "models that are kept (1 = all)", min=0.0, max=1.0)
    int8_mask: bool = param(False, help="store masks as int8 (memory only; same result)")


def sce(tensors, base, *, select_topk=1.0, int8_mask=False, out=None):
    """``base + Σ_i w_i m_i τ_i / max(Σ_i w_i m_i, 1e-6)`` with ``τ_i = X_i - base``.

    With ``select_topk < 1`` every τ keeps only the ``⌊select_topk · #(var ≠ 0)⌋`` entries of
    largest variance across the models. ``m_i`` marks entries whose sign matches the sign of
    ``Σ_i τ_i`` (+ for 0). ``w_i = mean(τ_i²) / Σ_j mean(τ_j²)``, or ``1/n`` when that sum is
    below 1e-6 (mergekit's absolute threshold, kept for parity). Works in the input dtype with
    mergekit 0.1.5's operations, chunk by chunk; task vectors are never held whole, and the
    pages of memory-mapped inputs go again once a pass has read them.
    """
    if base is None:
        raise MixcliError("sce needs a base model")
    if not tensors:
        return base if out is None else out.copy_(base)
    dtype = base.dtype
    mask_dtype = torch.int8 if int8_mask else dtype
    flat_base = base.reshape(-1)
    flats = [x.reshape(-1) for x in tensors]
    n, size = len(flats), flat_base.numel()
    mask = _variance_mask(flats, flat_base, select_topk, mask_dtype) if select_topk < 1 else None

    def deltas(a, b):
        """The (selected) task vectors over entries a..b, stacked; recomputed rather than held."""
        part = torch.stack([x[a:b] - flat_base[a:b] for x in flats], dim=0)
        return part if mask is None else part * mask[a:b]

    means = _mean_squares(flats, flat_base, mask)
    total = torch.sum(means).item()
    if abs(total) < _EQUAL_WEIGHTS_BELOW:
        weights = torch.ones_like(means) / means.shape[0]
    else:
        weights = means / total
    column = weights.view(-1, 1)
    if out is None:
        out = torch.empty(base.shape, dtype=dtype)
    flat_out = out.view(-1)
    for a, b in chunks(size):
        part = deltas(a, b)
        elected = (part.sum(dim=0) >= 0).to(mask_dtype) * 2 - 1
        erased = column * (part.sign().to(mask_dtype) == elected)
        merged = (part * erased).sum(dim=0) / torch.sum(erased, dim=0).clamp(min=1e-6)
        torch.add(flat_base[a:b], merged, out=flat_out[a:b])
        for x in (flat_base, *flats):
            release_pages(x[a:b])
    return out


ROW_BY_ROW_ABOVE = 1 << 16  # entries: larger tensors take their mean squares one model at a time


def _mean_squares(flats, flat_base, mask):
    """``mean(τ_i²)`` per model, rounded as mergekit's ``stack(τ).square().mean(dim=1)``.

    That is a whole-row reduction (a chunked sum rounds differently), so each row of squares is
    held whole, but one model at a time: the sum of the ``[n, N]`` stack over its rows is that
    of one row broadcast to ``n`` rows (stride 0: no copy), which torch reduces the same way,
    row by row, whatever the thread count (a plain 1-D sum splits across threads instead).
    Small tensors, where torch may lay the reduction out across rows, take the stack itself.
    A 16-bit mean is torch's float32 sum of a float32 copy, divided, rounded back: the squares
    go straight into that float32 row."""
    dtype = flat_base.dtype
    n, size = len(flats), flat_base.numel()
    wide = dtype in (torch.bfloat16, torch.float16)
    row_dtype = torch.float32 if wide else dtype

    def squares(x, a, b):
        part = x[a:b] - flat_base[a:b]
        return torch.square(part if mask is None else part * mask[a:b])

    if size <= ROW_BY_ROW_ABOVE:
        rows = torch.stack([squares(x, 0, size).to(row_dtype) for x in flats])
        return rows.sum(dim=1).div_(size).to(dtype) if wide else rows.mean(dim=1)
    row = torch.empty(size, dtype=row_dtype)
    means = []
    for x in flats:
        for a, b in chunks(size):
            row[a:b] = squares(x, a, b)
            release_pages(x[a:b])
            release_pages(flat_base[a:b])
        rows = row.view(1, size).expand(n, size)
        means.append(rows.sum(dim=1)[0].div(size).to(dtype) if wide else rows.mean(dim=1)[0])
    return torch.stack(means)


def _variance_mask(flats, flat_base, select_topk: float, mask_dtype):
    """1 at the ``⌊select_topk · #(var ≠ 0)⌋`` entries of largest population variance across
    the models (``torch.topk``'s choice among ties), else 0."""
    if select_topk <= 0:
        return torch.zeros_like(flat_base, dtype=mask_dtype)
    variance = torch.empty_like(flat_base)
    for a, b in chunks(flat_base.numel()):  # per entry, across the models: chunks are exact
        part = torch.stack([x[a:b] - flat_base[a:b] for x in flats], dim=0)
        torch.var(part, dim=0, unbiased=False, out=variance[a:b])
    k = int(torch.count_nonzero(variance) * select_topk)
    mask = torch.zeros_like(variance, dtype=mask_dtype)
    if k == 0:
        return mask
    _, indices = torch.topk(variance.abs(), k=k, largest=True)
    del variance
    mask[indices] = 1
    return mask


METHOD = MergeMethod(
    name="sce",
    summary="SCE: variance selection, mean-square weights and sign erase (FuseChat)",
    merge=sce,
    params=Params,
    base="required",
    min_inputs=1,
    accepts_out=True,
    # mergekit ignores these in sce recipes (often copied from ties); here they are errors
    param_hints={key: "sce computes its own weights and keeps entries by variance; use select_topk"
                 for key in ("weight", "density", "lambda", "normalize", "rescale")},
)
