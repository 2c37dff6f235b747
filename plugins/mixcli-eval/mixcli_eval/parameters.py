"""Parameter counts from safetensors headers: total, and active per token for MoE models."""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

from mixcli import Evaluator, param


@dataclass
class Params:
    expert_marker: str = param(".experts.", help="substring naming routed-expert tensors (MoE models)")


def count_parameters(folder, config: dict, expert_marker: str = ".experts.") -> dict:
    """``total``; ``active`` = total minus the expert weights a token does not use."""
    from mixcli.checkpoint import open_safetensors

    tensors = open_safetensors(folder, str(folder))
    total = sum(prod(info.shape) for info in tensors.values())
    experts = sum(prod(info.shape) for name, info in tensors.items() if expert_marker in name)
    text = config.get("text_config", config)
    count = text.get("num_local_experts") or text.get("num_experts")
    per_token = text.get("num_experts_per_tok") or text.get("experts_per_token")
    active = total
    if experts and count and per_token:
        active = total - experts + experts * per_token // count
    return {"total": total, "active": active}


def evaluate(context) -> dict:
    from mixcli.checkpoint import read_config

    config = read_config(context.model_path, str(context.model_path))
    return count_parameters(context.model_path, config, context.params["expert_marker"])


EVALUATOR = Evaluator(name="parameters", summary="parameter count: total, and active per token for MoE models",
                      evaluate=evaluate, params=Params, metrics={"total": "lower", "active": "lower"})
