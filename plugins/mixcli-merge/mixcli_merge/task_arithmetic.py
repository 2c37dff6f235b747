"""task_arithmetic (arXiv 2212.04089): ``base + lambda * sum_i w_i (X_i - base)``."""

from __future__ import annotations

import dataclasses

from mixcli import MergeMethod, param

from .generalized import TaskArithmeticParams, merge_task_vectors


@dataclasses.dataclass
class Params(TaskArithmeticParams):
    density: float = param(1.0, help="accepted for mergekit recipes; no effect (no pruning)",
                           per_model=True, min=0.0, max=1.0)
    rescale: bool = param(False, help="accepted for mergekit recipes; no effect (no pruning)")


def task_arithmetic(tensors, base, *, weight, density=1.0, lambda_=1.0, normalize=False,
                    rescale=False, int8_mask=False, out=None):
    """``base + lambda * sum_i w_i delta_i`` (divided by ``sum_i w_i`` with ``normalize``)."""
    return merge_task_vectors(tensors, base, weight=weight, lambda_=lambda_,
                              normalize=normalize, consensus=False, out=out)


METHOD = MergeMethod(
    name="task_arithmetic",
    summary="Add weighted task vectors (model - base) to the base",
    merge=task_arithmetic,
    params=Params,
    base="required",
    min_inputs=1,
    accepts_out=True,
)
