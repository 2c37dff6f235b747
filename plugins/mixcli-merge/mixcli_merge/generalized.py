"""The task-arithmetic family pipeline (spec §3.4.2), shared by task_arithmetic, ties,
dare_*, breadcrumbs*, della*.

Arithmetic follows mergekit 0.1.5 rounding points so bf16 results agree bit for bit: deltas,
masks, weights (rounded to the working dtype), products, the final division, lambda and the
addition of the base are operations in the working dtype; sums over models accumulate in
float32 (float64 for float64) in model order and are rounded once, as ``tensor.sum(dim=0)``.
The combination runs chunk by chunk so that its temporaries stay in cache.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from mixcli import MixcliError, param

from ._torch import torch
from .sparsify import Source, chunks


@dataclasses.dataclass
class TaskArithmeticParams:
    """Parameters common to the task-arithmetic family; methods override defaults."""

    weight: float = param(help="scale of this model's task vector (model - base)", per_model=True)
    density: float = param(1.0, help="fraction of each task vector kept (1 = no pruning)",
                           per_model=True, min=0.0, max=1.0)
    lambda_: float = param(1.0, help="scale applied to the combined task vector")
    normalize: bool = param(False, help="divide the combined task vector by the sum of weights")
    rescale: bool = param(False, help="rescale pruned task vectors to their original L1 norm")
    int8_mask: bool = param(False, help="store sign masks as int8 (memory only; same result)")


def per_model(value, n: int, name: str) -> list:
    """A per-model parameter as a list of ``n`` values (a scalar broadcasts)."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise MixcliError(f"parameter '{name}' has {len(value)} values for {n} models")
        return list(value)
    return [value] * n


def merge_task_vectors(
    tensors: list,
    base,
    *,
    weight,
    lambda_: float,
    normalize: bool,
    consensus: bool,
    sparsify: Callable | None = None,
    select: Callable | None = None,
    out=None,
):
    """``base + lambda * combine_i(weight_i * prune_i(tensors_i - base))``.

    Pruning is either eager, ``sparsify(i, delta)`` returning model ``i``'s pruned task
    vector (it may overwrite ``delta``), or lazy, ``select(i, source)`` returning a
    :class:`~mixcli_merge.sparsify.Selection` applied chunk by chunk (``None``: keep all,
    ``0``: drop all), so task vectors are never stored whole. With ``consensus`` (TIES sign
    election) an element keeps only the weighted deltas whose sign matches the sign of their
    sum (ties go to +, zeros never match) and the divisor is the sum of the matching weights
    (0 -> 1); without it the divisor is the sum of all weights (|sum| < 1e-8 -> 1). The
    divisor applies only with ``normalize``.
    """
    if base is None:
        raise MixcliError("this merge method needs a base model")
    if not tensors:
        return base if out is None else out.copy_(base)
    n = len(tensors)
    weights = per_model(weight, n, "weight")
    dtype = base.dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32

    sources, selections = [], []
    for i, x in enumerate(tensors):
        if sparsify is not None:
            sources.append(Source(sparsify(i, torch.sub(x, base))))
            selections.append(None)
        else:
            source = Source(x, base)
            sources.append(source)
            selections.append(select(i, source) if select is not None else None)
    w_work = [torch.tensor(w, dtype=dtype) for w in weights]  # rounded like mergekit's weights
    w_acc = [float(w) for w in w_work]
    divisor = None
    if normalize and not consensus:
        divisor = torch.tensor(weights, dtype=dtype).sum()
        if abs(float(divisor)) < 1e-8:
            divisor = torch.ones((), dtype=dtype)

    flat_base = base.reshape(-1)
    if out is None:
        out = torch.empty(base.shape, dtype=dtype)
    flat_out = out.view(-1)
    for c, (a, b) in enumerate(chunks(flat_out.numel())):
        parts = []
        for source, selection, w, wf in zip(sources, selections, w_work, w_acc):
            part = source.chunk(a, b)  # owned: a fresh chunk or our own stored delta
            if selection == 0:
                part.zero_()
            elif selection is not None:
                selection.apply(c, part)
            if wf != 1.0:
                part.mul_(w)  # rounded in the working dtype, as mergekit
            parts.append(part.to(acc))
        if consensus:
            mixed = _elect(parts, w_acc, dtype, normalize)
        else:
            total = parts[0]
            for part in parts[1:]:
                total.add_(part)
            mixed = total.to(dtype)
            if divisor is not None:
                mixed.div_(divisor)
        if lambda_ != 1:
            mixed.mul_(lambda_)
        torch.add(flat_base[a:b], mixed, out=flat_out[a:b])
    return out


def _elect(parts: list, w_acc: list, dtype, normalize: bool):
    """TIES sign election and disjoint (weighted) mean over one chunk of weighted deltas.

    ``parts`` are the weighted deltas converted exactly to the accumulation dtype (they are
    overwritten). With ``sign`` = +-1 the sign of their sum (+ for a zero sum), the agreeing
    entries are those with ``sign * D_i > 0``; summing ``relu(sign * D_i)`` in model order and
    multiplying by ``sign`` gives bit for bit the in-order sum of the agreeing entries.
    Arithmetic replaces bool masks, which are several times slower on CPU.
    """
    total = parts[0].clone()
    for part in parts[1:]:
        total.add_(part)
    # a sum is -0.0 only when every term is a zero, which agrees with neither sign
    sign = torch.copysign(torch.ones((), dtype=total.dtype), total)
    numer = total  # reused as the accumulator
    denom = None
    for i, (part, wf) in enumerate(zip(parts, w_acc)):
        agree = part.mul_(sign).relu_()
        if normalize:
            indicator = agree.sign()  # 1 where model i agrees, else 0
            if denom is None:
                denom = indicator.mul_(wf)  # exact: 0 or the bf16-rounded weight
            else:
                denom.add_(indicator, alpha=wf)
        if i == 0:
            numer.copy_(agree)
        else:
            numer.add_(agree)
    mixed = numer.mul_(sign).to(dtype)
    if denom is not None:
        if min(w_acc) > 0:
            # positive weights: a zero divisor means nothing agrees and numer is 0, so any
            # nonzero divisor gives mergekit's 0/1 = 0; clamping leaves other divisors alone
            denom.clamp_(min=min(w_acc))
        else:
            # a zero divisor becomes 1 (adds 1 - |sign(0)| = 1, else 0); exact
            denom.add_(denom.sign().abs_().neg_().add_(1))
        mixed.div_(denom.to(dtype))
    return mixed
