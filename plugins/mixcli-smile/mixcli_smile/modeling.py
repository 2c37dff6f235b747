"""The saved SMILE architectures (imports torch and transformers).

For each supported model type ``T`` the plugin registers a config ``Smile<TConfig>``
(``model_type = "smile_T"``, a subclass of the stock config with ``num_local_experts``,
``num_experts_per_tok``, ``rank_of_router``, ``rank_of_expert`` and ``smile_modules``) and,
for each stock model class of ``T``, a subclass ``Smile<Class>`` that builds the stock model
and replaces the Linears listed in ``smile_modules`` (paths inside the base model, e.g.
``layers.0.mlp.fc1``) by :class:`SmileLinear`. Forward, cache, attention and weight tying are
upstream's. Tensor names are FusionBench's LLM-path names for every architecture:
``P.gate.weight`` ``[n·R, d_in]``, ``P.shared_linear.{weight,bias}``, ``P.experts.{i}.u``
``[d_out, K]``, ``P.experts.{i}.svh`` ``[K, d_in]``, ``P.experts.{i}.bias``; dense experts
(``rank_of_expert <= 0``) hold ``P.experts.{i}.weight``. Everything is in the config and the
safetensors: loading needs neither the source models nor pickles.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import transformers
from torch import nn

from mixcli.backbone import get_module

# model_type -> (stock config class, {Auto class: stock model class}); the first is the default
ARCHITECTURES = {
    "vit": ("ViTConfig", {"AutoModel": "ViTModel"}),
    "clip_vision_model": ("CLIPVisionConfig", {"AutoModel": "CLIPVisionModel"}),
    "llama": ("LlamaConfig", {"AutoModelForCausalLM": "LlamaForCausalLM", "AutoModel": "LlamaModel"}),
    "mistral": ("MistralConfig", {"AutoModelForCausalLM": "MistralForCausalLM", "AutoModel": "MistralModel"}),
    "qwen2": ("Qwen2Config", {"AutoModelForCausalLM": "Qwen2ForCausalLM", "AutoModel": "Qwen2Model"}),
}
PREFIX = "smile_"


def _weight(*shape, dtype=None, device=None):
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


class LowRankExpert(nn.Module):
    """``x -> u (svh x) + bias``: the top-K singular components of one task vector."""

    def __init__(self, d_in: int, d_out: int, rank: int, bias: bool, dtype=None, device=None):
        super().__init__()
        self.u = _weight(d_out, rank, dtype=dtype, device=device)
        self.svh = _weight(rank, d_in, dtype=dtype, device=device)
        self.bias = _weight(d_out, dtype=dtype, device=device) if bias else None

    def forward(self, x):
        return F.linear(F.linear(x, self.svh), self.u, self.bias)


class DenseExpert(nn.Module):
    """``x -> ΔW x + Δb``: a whole task vector."""

    def __init__(self, d_in: int, d_out: int, bias: bool, dtype=None, device=None):
        super().__init__()
        self.weight = _weight(d_out, d_in, dtype=dtype, device=device)
        self.bias = _weight(d_out, dtype=dtype, device=device) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class SmileGate(nn.Module):
    """Router logits ``r_i(x) = ‖V_iᵀ x‖``: rows ``i·R … (i+1)·R − 1`` of ``weight`` are expert
    i's top-R right singular vectors (unscaled)."""

    def __init__(self, d_in: int, experts: int, rank: int, dtype=None, device=None):
        super().__init__()
        self.experts, self.rank = experts, rank
        self.weight = _weight(experts * rank, d_in, dtype=dtype, device=device)

    def forward(self, x):
        projected = F.linear(x, self.weight).float()
        return projected.reshape(*x.shape[:-1], self.experts, self.rank).norm(dim=-1)


class SmileLinear(nn.Module):
    """``y = W0 x + b0 + Σ_{i ∈ top_k(x)} w_i(x) (A_i B_i x + δb_i)`` per token, ``w`` the
    softmax of the router logits renormalised over the chosen experts (1 with one expert)."""

    def __init__(self, in_features: int, out_features: int, experts: int, top_k: int, rank_of_router: int,
                 rank_of_expert: int, bias: bool, dtype=None, device=None):
        super().__init__()
        kw = {"dtype": dtype, "device": device}
        self.in_features, self.out_features = in_features, out_features
        self.num_experts, self.top_k = experts, top_k
        self.gate = SmileGate(in_features, experts, rank_of_router, **kw)
        self.shared_linear = nn.Linear(in_features, out_features, bias=bias, **kw)
        for p in self.shared_linear.parameters():
            p.requires_grad_(False)
        self.experts = nn.ModuleList(
            LowRankExpert(in_features, out_features, rank_of_expert, bias, **kw) if rank_of_expert > 0
            else DenseExpert(in_features, out_features, bias, **kw) for _ in range(experts))

    def routing_weights(self, flat: torch.Tensor) -> torch.Tensor:
        """``[tokens, n]`` weights, zero outside each token's top-k experts."""
        if self.num_experts == 1:
            return torch.ones(flat.shape[0], 1, dtype=torch.float32, device=flat.device)
        p = torch.softmax(self.gate(flat), dim=-1)
        top, index = p.topk(min(self.top_k, self.num_experts), dim=-1)
        return torch.zeros_like(p).scatter(-1, index, top / top.sum(-1, keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        y = self.shared_linear(flat)
        weights = self.routing_weights(flat)
        for i, expert in enumerate(self.experts):
            rows = weights[:, i].nonzero().squeeze(-1)
            if rows.numel():  # only the tokens routed to this expert
                y = y.index_add(0, rows, expert(flat[rows]) * weights[rows, i:i + 1].to(y.dtype))
        return y.reshape(*x.shape[:-1], self.out_features)


def base_model_of(model: nn.Module) -> nn.Module:
    """The module ``smile_modules`` paths are relative to: ``model.model`` of a causal LM, the
    model itself for a base model (so the same config loads either)."""
    inner = getattr(model, getattr(model, "base_model_prefix", "") or "", None)
    return inner if isinstance(inner, nn.Module) else model


def install(model: nn.Module, config) -> None:
    """Replace each Linear of ``config.smile_modules`` by a :class:`SmileLinear` of its shape."""
    root = base_model_of(model)
    for path in config.smile_modules:
        parent_path, _, attr = path.rpartition(".")
        parent = get_module(root, parent_path) if parent_path else root
        old = getattr(parent, attr, None) if parent is not None else None
        if not isinstance(old, nn.Linear):
            raise ValueError(f"smile_modules names '{path}', which is not a Linear of {type(root).__name__}")
        setattr(parent, attr, SmileLinear(old.in_features, old.out_features, config.num_local_experts,
                                          config.num_experts_per_tok, config.rank_of_router, config.rank_of_expert,
                                          old.bias is not None, dtype=old.weight.dtype, device=old.weight.device))


def _make_config_class(stock):
    def __init__(self, num_local_experts: int = 1, num_experts_per_tok: int = 1, rank_of_router: int = 1,
                 rank_of_expert: int = 128, smile_modules: list | None = None, mixcli: dict | None = None, **kwargs):
        self.num_local_experts, self.num_experts_per_tok = num_local_experts, num_experts_per_tok
        self.rank_of_router, self.rank_of_expert = rank_of_router, rank_of_expert
        self.smile_modules = list(smile_modules or [])
        self.mixcli = mixcli or {}
        stock.__init__(self, **kwargs)

    model_type = PREFIX + stock.model_type
    return type(f"Smile{stock.__name__}", (stock,), {"model_type": model_type, "__init__": __init__,
                                                      "__module__": __name__})


def _make_model_class(stock, config_class):
    def __init__(self, config, *args, **kwargs):
        stock.__init__(self, config, *args, **kwargs)
        install(self, config)

    def _init_weights(self, module):  # every SMILE tensor is stored; the rest is upstream's
        if not isinstance(module, (SmileGate, LowRankExpert, DenseExpert)):
            stock._init_weights(self, module)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """Upstream's, refusing a checkpoint that lacks a tensor (transformers would invent it)."""
        info = kwargs.pop("output_loading_info", False)
        model, loading = stock.from_pretrained.__func__(cls, *args, output_loading_info=True, **kwargs)
        missing = [key for key in loading.get("missing_keys", ()) if key not in _tied(model)]
        if missing:
            raise ValueError(f"{cls.__name__}: the checkpoint lacks {len(missing)} tensor(s), e.g. "
                             f"'{sorted(missing)[0]}'; it was not written by smile_upscaling for this config")
        return (model, loading) if info else model

    return type(f"Smile{stock.__name__}", (stock,), {"config_class": config_class, "__init__": __init__,
                                                      "_init_weights": _init_weights,
                                                      "from_pretrained": from_pretrained, "__module__": __name__})


def _tied(model) -> set[str]:
    """Names of parameters that share another's storage (a tied lm_head): never stored."""
    unique = {name for name, _ in model.named_parameters()}
    return {name for name, _ in model.named_parameters(remove_duplicate=False)} - unique


CONFIGS: dict[str, type] = {}  # smile model_type -> config class
MODELS: dict[str, dict[str, type]] = {}  # smile model_type -> {Auto class: model class}
for _type, (_config, _models) in ARCHITECTURES.items():
    _smile_config = _make_config_class(getattr(transformers, _config))
    CONFIGS[_smile_config.model_type] = _smile_config
    MODELS[_smile_config.model_type] = {auto: _make_model_class(getattr(transformers, name), _smile_config)
                                        for auto, name in _models.items()}
    globals()[_smile_config.__name__] = _smile_config
    for _cls in MODELS[_smile_config.model_type].values():
        globals()[_cls.__name__] = _cls


def register(register_fn) -> None:
    for model_type, config_class in CONFIGS.items():
        register_fn(model_type, config_class, MODELS[model_type])


def smile_classes(model_type: str, architecture: str | None = None):
    """(SMILE config class, SMILE model class, stock model class name, Auto class name) for a
    stock ``model_type``; the model class matches ``architecture`` (the checkpoint's
    ``architectures[0]``) when it is one of the stock classes, else the default."""
    config_class = CONFIGS[PREFIX + model_type]
    models = ARCHITECTURES[model_type][1]
    auto = next((a for a, name in models.items() if name == architecture), next(iter(models)))
    return config_class, MODELS[config_class.model_type][auto], models[auto], auto
