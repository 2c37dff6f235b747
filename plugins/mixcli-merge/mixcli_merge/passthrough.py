"""passthrough: copy the single input, optionally scaled (frankenmerges, depth up-scaling)."""

from __future__ import annotations

import dataclasses

from mixcli import MergeMethod, MixcliError, param


@dataclasses.dataclass
class Params:
    scale: float | None = param(None, help="multiply this model's tensors by this factor",
                                per_model=True)


def passthrough(tensors, base=None, *, scale=None):
    """The one input tensor, times ``scale`` when given (non-floating tensors are copied)."""
    if len(tensors) != 1:
        raise MixcliError("passthrough takes exactly one model per tensor")
    x = tensors[0]
    value = scale[0] if isinstance(scale, (list, tuple)) else scale
    if value is None or not x.is_floating_point():
        return x
    return x * value


METHOD = MergeMethod(
    name="passthrough",
    summary="Copy tensors from one model, optionally scaled",
    merge=passthrough,
    params=Params,
    base="ignored",
    min_inputs=1,
    max_inputs=1,
)
