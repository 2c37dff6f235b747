"""Router bookkeeping for tuning: which parameters are routers, capturing router logits during
a forward pass, and the Switch-Transformer load-balancing loss (arXiv 2101.03961) in the
pooled form transformers' Mixtral uses, made exact across data-parallel ranks."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mixcli.training import all_reduce

ROUTER_SUFFIXES = (".mlp.gate.weight", ".block_sparse_moe.gate.weight", ".router.weight")


def is_router(name: str) -> bool:
    return name.endswith(ROUTER_SUFFIXES)


def group_of(module_name: str) -> str:
    """"mlp" for Mixtral MLP routers, else the attention projection's name (q_proj...)."""
    if module_name.endswith(".router"):
        return module_name.split(".")[-2]
    return "mlp"


class RouterCapture:
    """Forward hooks on every router module; ``logits[group]`` lists ``[rows, E]`` per layer."""

    def __init__(self, model):
        self.logits: dict[str, list] = {}
        self.handles = []
        for name, module in model.named_modules():
            if name.endswith(".mlp.gate") or name.endswith(".block_sparse_moe.gate") or name.endswith(".router"):
                self.handles.append(module.register_forward_hook(self._hook(group_of(name))))

    def _hook(self, group: str):
        def hook(module, inputs, output):
            logits = output[0] if isinstance(output, tuple) else output
            self.logits.setdefault(group, []).append(logits.reshape(-1, logits.shape[-1]))
        return hook

    def clear(self) -> None:
        self.logits = {}

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def balance_loss(layer_logits: list, mask: torch.Tensor, k: int) -> torch.Tensor:
    """E * sum_e f_e * P_e over the rows of every layer pooled, padding rows dropped.

    f_e (fraction of (row, slot) assignments to e; sums to k) and the row count are summed
    over all ranks first; P_e's numerator stays local, so the gradients the ranks sum equal
    the gradient of the loss over the global batch. Uniform routing gives exactly k.
    """
    keep = mask.reshape(-1).bool()
    rows = torch.cat([logits[keep] for logits in layer_logits])
    experts = rows.shape[-1]
    probs = torch.softmax(rows.float(), dim=-1)
    chosen = torch.topk(probs, k, dim=-1).indices
    counts = F.one_hot(chosen, experts).sum(dim=(0, 1)).to(torch.float32)
    stats = all_reduce(torch.cat([counts, torch.tensor([float(rows.shape[0])])]))
    counts, total = stats[:-1], stats[-1].clamp(min=1.0)
    return experts * torch.sum(counts / total * probs.sum(0) / total)


def load_fractions(layer_logits: list, mask: torch.Tensor, k: int) -> list[list[float]]:
    """Per layer, the fraction of token assignments each expert receives."""
    keep = mask.reshape(-1).bool()
    out = []
    for logits in layer_logits:
        chosen = torch.topk(logits[keep].float(), k, dim=-1).indices
        counts = F.one_hot(chosen, logits.shape[-1]).sum(dim=(0, 1)).to(torch.float64)
        out.append((counts / counts.sum().clamp(min=1)).tolist())
    return out


def reference_balance_loss(layer_logits: list, k: int) -> torch.Tensor:
    """transformers' ``load_balancing_loss_func`` (no mask), for checking :func:`balance_loss`."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    return load_balancing_loss_func(tuple(layer_logits), layer_logits[0].shape[-1], k)
