"""model_stock (arXiv 2403.19522): interpolate between the base and the fine-tunes' mean by
the fine-tunes' mutual angle."""

from __future__ import annotations

import dataclasses

from mixcli import MergeMethod, MixcliError, param

from ._torch import torch


@dataclasses.dataclass
class Params:
    filter_wise: bool = param(False, help="compute the interpolation per row instead of per tensor")


def model_stock(tensors, base, *, filter_wise=False):
    """``t * mean_i(X_i) + (1 - t) * base`` with ``t = n c / (1 + (n - 1) c)``, ``c`` the mean
    pairwise cosine of the offsets ``X_i - base`` (``t = 0`` where the denominator is ~0).

    Computed in the input dtype with mergekit 0.1.5's operation order; per row of the last
    dimension with ``filter_wise`` (a 1-D tensor is one row), else over the whole tensor.
    """
    if base is None or len(tensors) < 2:
        raise MixcliError("model_stock needs a base model and at least two other models")
    shape = base.shape
    if filter_wise:
        w0 = base.unsqueeze(0) if base.dim() == 1 else base
        ws = [x.unsqueeze(0) if x.dim() == 1 else x for x in tensors]
    else:
        w0 = base.reshape(-1)
        ws = [x.reshape(-1) for x in tensors]
    offsets = [x - w0 for x in ws]
    cosines = []
    for i, oa in enumerate(offsets):
        for ob in offsets[i + 1:]:
            norms = torch.linalg.vector_norm(oa, dim=-1) * torch.linalg.vector_norm(ob, dim=-1)
            cosines.append(((oa * ob).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    del offsets
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    count = len(ws)
    denominator = 1 + (count - 1) * cos
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos),
                    (count * cos) / torch.where(singular, torch.ones_like(denominator), denominator))
    total = ws[0] + 0  # mergekit: sum(ws) starts from 0, adding in order
    for x in ws[1:]:
        total = total + x
    average = total / count
    return (t * average + (1 - t) * w0).reshape(shape)


METHOD = MergeMethod(
    name="model_stock",
    summary="Model stock: move from the base toward the fine-tunes' mean by their agreement",
    merge=model_stock,
    params=Params,
    base="required",
    min_inputs=2,
    partial_tensors="base_or_skip",
)
