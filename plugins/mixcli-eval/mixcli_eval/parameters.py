"""Parameter counts from safetensors headers (or a resident model's tensors): total, and active
per token for MoE models."""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

from mixcli import Evaluator, param


@dataclass
class Params:
    expert_marker: str = param(".experts.", help="substring naming routed-expert tensors (MoE models)")


def stored_shapes(context) -> dict[str, tuple]:
    """The shape of every tensor the model stores: from the folder's safetensors headers, or
    the resident model's state dict with tied tensors once (as saving it would store them)."""
    if context.model is None:
        from mixcli.checkpoint import open_safetensors

        return {name: info.shape for name, info in open_safetensors(context.model_path,
                                                                    str(context.model_path)).items()}
    shapes, seen = {}, set()
    for name, tensor in context.model.state_dict().items():
        key = (tensor.data_ptr(), tuple(tensor.shape)) if tensor.numel() else (name,)
        if key not in seen:
            seen.add(key)
            shapes[name] = tuple(tensor.shape)
    return shapes


def count_parameters(shapes: dict[str, tuple], config: dict, expert_marker: str = ".experts.") -> dict:
    """``total``; ``active`` = total minus the expert weights a token does not use."""
    total = sum(prod(shape) for shape in shapes.values())
    experts = sum(prod(shape) for name, shape in shapes.items() if expert_marker in name)
    text = config.get("text_config", config)
    count = text.get("num_local_experts") or text.get("num_experts")
    per_token = text.get("num_experts_per_tok") or text.get("experts_per_token")
    active = total
    if experts and count and per_token:
        active = total - experts + experts * per_token // count
    return {"total": total, "active": active}


def evaluate(context) -> dict:
    return count_parameters(stored_shapes(context), context.config(), context.params["expert_marker"])


EVALUATOR = Evaluator(name="parameters", summary="parameter count: total, and active per token for MoE models",
                      evaluate=evaluate, params=Params, metrics={"total": "lower", "active": "lower"})
