"""arcee_fusion: keep the fine-tune's changes whose importance ``|δ| · KL`` is an outlier."""

from __future__ import annotations

import dataclasses

from mixcli import MergeMethod, MixcliError
from mixcli.seeding import generator

from ._torch import torch
from .sparsify import chunks

_SAMPLE = 1_000_000  # quantiles of larger tensors come from this many entries drawn at random
_SOFTMAX_EPS = 1e-8
_ROWS = 1 << 18  # entries per chunk of rows


@dataclasses.dataclass
class Params:
    """arcee_fusion has no parameters."""


def arcee_fusion(tensors, base, *, seed=0, out=None):
    """``base + (X - base) · [I >= Q2 + 1.5 (Q3 - Q1)]`` with importance ``I = |X - base| · KL``,
    ``KL = Σ p log(p / q)`` per row of the last dimension, ``p = softmax(X) + 1e-8`` and
    ``q = softmax(base) + 1e-8``; ``Q1..Q3`` are the quartiles of ``I`` (the sorted entry at
    ``⌊q (N - 1)⌋``, no interpolation).

    Importances are computed in the input dtype as mergekit 0.1.5 does, a chunk of rows at a
    time. For tensors of more than 1e6 entries the quartiles come from 1e6 entries drawn with
    replacement by a generator seeded by ``seed`` (mergekit uses the global generator). The
    mask is float32 as in mergekit, so the combination is computed in float32; it is rounded to
    the input dtype (mergekit returns float32, which its writer stores as is).
    """
    if base is None or len(tensors) != 1:
        raise MixcliError("arcee_fusion needs a base model and exactly one other model")
    if not base.is_floating_point():
        raise MixcliError("arcee_fusion needs floating-point tensors")
    x = tensors[0]
    importance = torch.empty_like(base)
    rows_x, rows_b, rows_i = (_rows(v) for v in (x, base, importance))
    count, length = rows_x.shape
    # the KL sums are row reductions: chunks keep enough rows that torch reduces each row as
    # it does in one call over the whole tensor; very long rows are done in one call
    step = count if length > _ROWS else max(64, _ROWS // max(1, length))
    for a in range(0, count, step):
        p = torch.softmax(rows_x[a:a + step], dim=-1) + _SOFTMAX_EPS
        q = torch.softmax(rows_b[a:a + step], dim=-1) + _SOFTMAX_EPS
        kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
        del p, q
        torch.mul((rows_x[a:a + step] - rows_b[a:a + step]).abs(), kl, out=rows_i[a:a + step])
    threshold = _fence(importance.view(-1), seed)
    if out is None:
        out = torch.empty_like(base)
    flat_out, flat_x, flat_b, flat_i = out.view(-1), x.reshape(-1), base.reshape(-1), importance.view(-1)
    for a, b in chunks(flat_out.numel()):
        keep = (flat_i[a:b] >= threshold).float()
        flat_out[a:b] = flat_b[a:b] + (flat_x[a:b] - flat_b[a:b]) * keep  # float32, rounded once
    return out


def _rows(v):
    """``v`` as rows of its last dimension (a 0-dim tensor is one row of one)."""
    return v.reshape(1, 1) if v.dim() == 0 else v.reshape(-1, v.shape[-1])


def _fence(flat, seed):
    """``Q2 + 1.5 (Q3 - Q1)`` of ``flat`` (sampled down to 1e6 entries first)."""
    if flat.numel() > _SAMPLE:
        flat = flat[torch.randint(flat.numel(), (_SAMPLE,), generator=generator(seed))]
    ordered, _ = torch.sort(flat)
    at = (torch.tensor([0.25, 0.5, 0.75]) * (ordered.numel() - 1)).long()
    q1, median, q3 = ordered[at]
    return median + 1.5 * (q3 - q1)


METHOD = MergeMethod(
    name="arcee_fusion",
    summary="Keep the fine-tune's changes whose importance |delta|*KL is an outlier",
    merge=arcee_fusion,
    params=Params,
    base="required",
    min_inputs=1,
    max_inputs=1,
    random=True,
    partial_tensors="singleton",
    accepts_out=True,
)
