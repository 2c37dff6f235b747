"""``mixcli_mixllama``: a Mixtral whose attention projections can be routed experts.

Registered with transformers' Auto classes by this plugin's ``register_architectures`` hook,
so ``AutoModelForCausalLM.from_pretrained`` loads it once ``mixcli.plugins.
register_architectures()`` has run (mixcli does that before evaluating). The config has no
``auto_map``: without mixcli-moe installed, transformers refuses the unknown model type.

Config flags (moetify's names): ``moe_mlp``, ``moe_query``, ``moe_key``, ``moe_value``,
``moe_output`` (o_proj; this plugin's addition) and ``moe_layer_idx`` (mixed layers; null =
all). In a mixed layer each flagged projection ``P`` becomes :class:`RoutedLinear`: experts
``self_attn.P.experts.{e}.weight`` and a bias-free router ``self_attn.P.router.weight``
``[E, in]`` on the projection's input (``in`` = H, or heads x head_dim for o_proj); per
token ``p = softmax(router(x))`` in float32, top-k, renormalised, ``y = sum_e w_e W_e x``.
The MLP of a mixed layer (with ``moe_mlp``) is the stock Mixtral block; every other MLP is
dense (``mlp.gate_proj/up_proj/down_proj``). Importing this module imports torch and
transformers.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import MixtralConfig, MixtralForCausalLM
from transformers.activations import ACT2FN

MODEL_TYPE = "mixcli_mixllama"
PROJECTIONS = {"q_proj": "moe_query", "k_proj": "moe_key", "v_proj": "moe_value", "o_proj": "moe_output"}


class MixLlamaConfig(MixtralConfig):
    model_type = MODEL_TYPE

    def __init__(self, moe_mlp: bool = True, moe_query: bool = False, moe_key: bool = False,
                 moe_value: bool = False, moe_output: bool = False, moe_layer_idx: list | None = None, **kwargs):
        self.moe_mlp, self.moe_query, self.moe_key, self.moe_value = moe_mlp, moe_query, moe_key, moe_value
        self.moe_output = moe_output
        self.moe_layer_idx = moe_layer_idx
        super().__init__(**kwargs)

    def is_mixed(self, layer: int) -> bool:
        return self.moe_layer_idx is None or layer in self.moe_layer_idx


def route(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax in float32, top-k, renormalised: (weights [T, k], indices [T, k])."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, indices = torch.topk(probs, k, dim=-1)
    return weights / weights.sum(dim=-1, keepdim=True), indices


class RoutedLinear(nn.Module):
    """A linear projection as a mixture of ``experts`` linear maps, top-k routed per token."""

    def __init__(self, in_features: int, out_features: int, experts: int, k: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.top_k = in_features, out_features, k
        self.experts = nn.ModuleList(nn.Linear(in_features, out_features, bias=bias) for _ in range(experts))
        self.router = nn.Linear(in_features, experts, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        weights, indices = route(self.router(flat), self.top_k)
        out = torch.zeros(flat.shape[0], self.out_features, dtype=flat.dtype, device=flat.device)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(indices == e)
            if token.numel() == 0:
                continue
            y = expert(flat[token]) * weights[token, slot, None].to(flat.dtype)
            out.index_add_(0, token, y)
        return out.reshape(*shape[:-1], self.out_features)


class DenseMLP(nn.Module):
    """The Llama MLP (for layers whose MLP is not mixed)."""

    def __init__(self, config):
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=False)
        self.up_proj = nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class MixLlamaForCausalLM(MixtralForCausalLM):
    config_class = MixLlamaConfig

    def __init__(self, config: MixLlamaConfig):
        super().__init__(config)
        for index, layer in enumerate(self.model.layers):
            mixed = config.is_mixed(index)
            if not (config.moe_mlp and mixed):
                layer.mlp = DenseMLP(config)
            if not mixed:
                continue
            attention = layer.self_attn
            for name, flag in PROJECTIONS.items():
                if getattr(config, flag):
                    dense = getattr(attention, name)
                    setattr(attention, name, RoutedLinear(dense.in_features, dense.out_features,
                                                          config.num_local_experts, config.num_experts_per_tok,
                                                          bias=dense.bias is not None))
        self.post_init()
