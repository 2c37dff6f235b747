"""The saved architecture: ``WEMoEConfig`` (model_type ``mixcli_wemoe``) and ``WEMoEModel``.

The model wraps a stock transformers backbone (``AutoModel.from_config(backbone_config)``)
whose upscaled blocks' Linears are replaced by routed Linears; state-dict names are the
backbone's own under ``backbone.`` plus ``delta_weight``/``delta_bias`` (task vectors) or
``expert_u``/``expert_v`` (rank-one components) next to each routed Linear's ``weight``, and
``routers.<i>.*``. Everything the structure needs is in the config, so loading needs neither
the source models nor pickles. The forward returns the backbone's output unchanged.
"""

from __future__ import annotations

import contextlib

import torch
import transformers
from torch import nn

from mixcli.backbone import get_module as _get
from .layers import RankOneLinear, Router, RoutingGroup, RoutingState, WELinear, routed_linears

MODEL_TYPE = "mixcli_wemoe"
# backbone settings copied onto the wrapper config so evaluators that read them still work
MIRRORED = ("image_size", "num_channels", "hidden_size", "num_hidden_layers", "vocab_size", "patch_size")


class WEMoEConfig(transformers.PretrainedConfig):
    model_type = MODEL_TYPE

    def __init__(self, backbone_config: dict | None = None, method: str = "we_moe", num_experts: int = 1,
                 expert_names: list | None = None, blocks: list | None = None, router_hidden_layers: int = 2,
                 router_hidden_size: int = 0, router_input: str = "hidden", init_lambda: float = 0.3,
                 shared_lambda: float | None = None, batch_reduce: bool = False, shared_gate: bool = False,
                 position_encoding: bool = False, position_encoding_dim: int = 8, expert_kind: str = "dense",
                 rank_k: int = 0, select_k: int = -1, mixcli: dict | None = None,
                 backbone_kwargs: dict | None = None, **kwargs):
        self.backbone_config = backbone_config or {}
        self.backbone_kwargs = dict(backbone_kwargs or {})  # e.g. add_pooling_layer=False
        self.method, self.num_experts = method, num_experts
        self.expert_names = list(expert_names or [])
        self.blocks = list(blocks or [])  # [{"name", "kind", "entries", "others", "layer"}]
        self.router_hidden_layers, self.router_hidden_size = router_hidden_layers, router_hidden_size
        self.router_input = router_input  # "hidden" (WE-MoE family) or "preference" (PWE-MoE)
        self.init_lambda = init_lambda
        self.shared_lambda = init_lambda if shared_lambda is None else shared_lambda
        self.batch_reduce, self.shared_gate = batch_reduce, shared_gate
        self.position_encoding, self.position_encoding_dim = position_encoding, position_encoding_dim
        self.expert_kind, self.rank_k, self.select_k = expert_kind, rank_k, select_k
        self.mixcli = mixcli or {}
        for key in MIRRORED:
            if key in self.backbone_config and key not in kwargs:
                kwargs[key] = self.backbone_config[key]
        super().__init__(**kwargs)

    @property
    def num_components(self) -> int:
        return self.num_experts * (self.rank_k if self.expert_kind == "rank_one" else 1)


def backbone_config(config: WEMoEConfig):
    data = dict(config.backbone_config)
    return transformers.AutoConfig.for_model(data.pop("model_type"), **data)


class WEMoEModel(transformers.PreTrainedModel):
    config_class = WEMoEConfig
    base_model_prefix = "wemoe"
    main_input_name = "pixel_values"
    _no_split_modules: list = []

    def __init__(self, config: WEMoEConfig):
        super().__init__(config)
        inner = backbone_config(config)
        self.backbone = transformers.AutoModel.from_config(inner, **config.backbone_kwargs)
        self.main_input_name = getattr(self.backbone, "main_input_name", "pixel_values")
        self.routing = RoutingState(config.batch_reduce)
        k = config.num_components
        routers = []
        self.groups: list[RoutingGroup] = []
        for block in config.blocks:
            entry = _get(self.backbone, block["entries"][0])
            d_in = entry.in_features
            if config.router_input == "preference":
                d_in = config.num_experts
            if not routers or not config.shared_gate:
                hidden = config.router_hidden_size or (2 * k if config.expert_kind == "rank_one" else d_in)
                pos = config.position_encoding_dim if config.position_encoding else 0
                routers.append(Router(d_in, k, config.router_hidden_layers, hidden, config.init_lambda, pos))
            group = RoutingGroup(routers[-1], self.routing, block.get("layer", 0), config.select_k)
            self.groups.append(group)
            for path in block["entries"] + block["others"]:
                self._replace(path, group, path in block["entries"])
        self.routers = nn.ModuleList(routers)
        if config.router_input == "preference":  # until set_preference: equal weight on every task
            # explicit device: from_pretrained builds modules under a meta-device context, and this
            # plain tensor (not a parameter or buffer) would never be materialised
            self.routing.preference = torch.full((config.num_experts,), 1.0 / config.num_experts, device="cpu")
        self.post_init()

    def _replace(self, path: str, group: RoutingGroup, entry: bool) -> None:
        parent_path, _, attr = path.rpartition(".")
        parent = _get(self.backbone, parent_path) if parent_path else self.backbone
        old = getattr(parent, attr)
        cfg = self.config
        kw = {"dtype": old.weight.dtype, "device": old.weight.device}
        if cfg.expert_kind == "rank_one":
            new = RankOneLinear(old.in_features, old.out_features, cfg.num_components, old.bias is not None, **kw)
        else:
            new = WELinear(old.in_features, old.out_features, cfg.num_experts, old.bias is not None, **kw)
        new.group, new.is_entry = group, entry
        setattr(parent, attr, new)

    def _init_weights(self, module):  # every tensor is stored; routers get their init at build time
        pass

    def get_input_embeddings(self):
        return self.backbone.get_input_embeddings()

    def forward(self, *args, attention_mask=None, **kwargs):
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        self.routing.token_mask = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
        try:
            return self.backbone(*args, **kwargs)
        finally:
            self.routing.token_mask = None
            for group in self.groups:
                group.reset()

    # ---------------------------------------------------------------- routing controls
    def set_batch_reduce(self, value: bool) -> None:
        """One flag for every routed block (the flag lives in the shared routing state)."""
        self.routing.batch_reduce = bool(value)
        self.config.batch_reduce = bool(value)

    @contextlib.contextmanager
    def forced_routing(self, coefficients):
        """Every block uses ``coefficients`` ([K] or [B, K]) instead of its router."""
        old = self.routing.forced
        self.routing.forced = torch.as_tensor(coefficients, dtype=torch.float32)
        try:
            yield self
        finally:
            self.routing.forced = old

    @contextlib.contextmanager
    def recording(self):
        """Collect ``(layer, coefficients)`` of every block during the forwards inside."""
        self.routing.record = []
        try:
            yield self.routing.record
        finally:
            self.routing.record = None

    def set_preference(self, preference) -> None:
        """PWE-MoE: the preference vector the routers read (non-negative, normalised here)."""
        p = torch.as_tensor(preference, dtype=torch.float32).flatten()
        if p.numel() != self.config.num_experts or (p < 0).any() or p.sum() <= 0:
            raise ValueError(f"preference must be {self.config.num_experts} non-negative numbers with a "
                             f"positive sum, got {p.tolist()}")
        self.routing.preference = p / p.sum()

    def router_parameters(self) -> list[nn.Parameter]:
        return list(self.routers.parameters())

    @torch.no_grad()
    def merge_and_unload(self, coefficients=None):
        """A plain backbone (stock transformers class) with every routed Linear collapsed to
        its merged weights for ``coefficients`` ([K]); for PWE-MoE, those the routers give for
        the current preference when ``coefficients`` is None. Each block uses its own router."""
        import copy

        plain = copy.deepcopy(self.backbone)
        names = dict(routed_linears(plain))
        for group, block in zip(self.groups, self.config.blocks):
            if coefficients is not None:
                c = torch.as_tensor(coefficients, dtype=torch.float32)
            elif self.routing.preference is not None:
                c = group.router(self.routing.preference.to(self.device)).float()
            elif group.router.depth == 0:
                c = group.router.bias.float()
            else:
                raise ValueError("merge_and_unload needs coefficients (or a preference for PWE-MoE)")
            for path in block["entries"] + block["others"]:
                routed = names[path]
                w, b = routed.merged(c.to(routed.weight.device))
                linear = nn.Linear(routed.in_features, routed.out_features, bias=b is not None,
                                   dtype=w.dtype, device=w.device)
                linear.weight.copy_(w)
                if b is not None:
                    linear.bias.copy_(b)
                parent_path, _, attr = path.rpartition(".")
                setattr(_get(plain, parent_path) if parent_path else plain, attr, linear)
        for p in plain.parameters():
            p.requires_grad_(True)
        return plain


def register(register_fn) -> None:
    register_fn(MODEL_TYPE, WEMoEConfig, {"AutoModel": WEMoEModel})
