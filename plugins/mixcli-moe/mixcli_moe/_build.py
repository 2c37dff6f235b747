"""The output plan shared by moe_upcycle and moe_merge.

Everything is checked from configs and headers first; random routers are drawn here, prompt
modes' routers are computed when the engine writes the first of them; each output tensor becomes an
:class:`~mixcli.plan.OutputTensor` whose ``compute`` reads its few source tensors on demand,
so the engine streams the model a tensor at a time.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field

from mixcli import MixcliError
from mixcli.architecture import check_layer_count, head_name, head_source, is_tied, layout_of
from mixcli.plan import OutputPlan, OutputTensor, output_dtype_name
from mixcli.seeding import derive_seed

from . import routers as router_init
from ._stem import stem_tensor, stem_sources
from ._target import (ATTENTION, MLP_PARTS, Names, check_input_config, check_names, is_custom,
                      native_layout, output_config, parameter_counts)

CODES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}


@dataclass
class Recipe:
    base: str  # donor of the stem (with stem = "base") and of the tokenizer
    experts: list[str]  # model name of each expert slot
    k: int
    modules: tuple = ("mlp",)
    layers: list[int] | None = None  # mixed layers; None = all
    layout: str = ""
    gate_mode: str = "uniform_random"
    scale: float = router_init.RANDOM_SCALE  # std of gate_mode "random"
    hidden_dtype: str = "bfloat16"
    hidden_source: str = "router_input"  # hidden modes: what the states are read from (see routers.py)
    stem: str = "base"
    stem_params: dict = field(default_factory=dict)
    noise: list[float] = field(default_factory=list)
    residual: list[float] = field(default_factory=list)
    positive: list[list[str]] = field(default_factory=list)
    negative: list[list[str]] = field(default_factory=list)
    aux_loss_coef: float = 0.01


def warn(message: str) -> None:
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True, highlight=False).print(f"[yellow]warning:[/] {escape(message)}", soft_wrap=True)


def check_models(context, recipe: Recipe, where: str) -> None:
    """Same model type, tensor names and shapes everywhere; every layer has a gate/up/down MLP."""
    base = context.models[recipe.base]
    for name in dict.fromkeys([recipe.base, *recipe.experts]):
        check_input_config(context.models[name].config, name, where)
        check_layer_count(context.models[name], context.project.models[name].where)
    for name in dict.fromkeys(recipe.experts):
        other = context.models[name]
        if other.config.get("model_type") != base.config.get("model_type"):
            raise MixcliError(f"{where}: model '{name}' is a {other.config.get('model_type')} and the base "
                              f"'{recipe.base}' a {base.config.get('model_type')}; all models must share one "
                              "architecture")
        for tensor, info in base.tensors.items():
            theirs = other.tensors.get(tensor)
            if theirs is None and tensor == head_name(other) and is_tied(other):
                theirs = other.tensors[head_source(other)]  # a tied model's head is its embedding
            if theirs is None:
                raise MixcliError(f"{where}: model '{name}' has no tensor '{tensor}' that the base "
                                  f"'{recipe.base}' has; all models must share one architecture")
            if tuple(theirs.shape) != tuple(info.shape):
                raise MixcliError(f"{where}: experts of different shapes: '{tensor}' is {list(theirs.shape)} in "
                                  f"'{name}' and {list(info.shape)} in the base '{recipe.base}'; all models "
                                  "must share one architecture and size")
    layers = base.num_layers or 0
    for layer in range(layers):
        for part in MLP_PARTS:
            if Names.dense(layer, part) not in base.tensors:
                raise MixcliError(f"{where}: model '{recipe.base}' has no '{Names.dense(layer, part)}'; MoE "
                                  "mixing needs a gate_proj/up_proj/down_proj MLP in every layer")


def check_recipe(context, recipe: Recipe, where: str) -> None:
    count = len(recipe.experts)
    if count < 1:
        raise MixcliError(f"{where}: no experts; list the expert models (experts = [...])")
    if recipe.k < 1 or recipe.k > count:
        raise MixcliError(f"{where}: experts_per_token ({recipe.k}) is larger than the number of experts "
                          f"({count})" if recipe.k > count else f"{where}: experts_per_token must be >= 1")
    layers = context.models[recipe.base].num_layers or 0
    for layer in recipe.layers or []:
        if not 0 <= layer < layers:
            raise MixcliError(f"{where}: layers lists {layer}, but the models have layers 0..{layers - 1}")
    if "o_proj" in recipe.modules and recipe.gate_mode == "cheap_embed":
        raise MixcliError(f"{where}: gate_mode 'cheap_embed' cannot initialise o_proj routers (o_proj reads "
                          "the attention output, not token embeddings); use 'hidden' or 'random'")
    custom = is_custom(recipe.modules, recipe.layers, {})
    native = native_layout()
    if recipe.layout and custom and recipe.layout != native:
        raise MixcliError(f"{where}: layout '{recipe.layout}' is not available with attention experts; the "
                          f"mixcli_mixllama architecture uses the installed transformers' layout '{native}'")


def routers_for(context, recipe: Recipe, shape: tuple[int, int, int], o_proj_width: int, where: str):
    """The routers, float32, by router group (``get(group)``): ``[L, E, H]`` for mlp and q/k/v,
    ``[L, E, A]`` (A = o_proj's input width) for o_proj; computed later for the prompt-based
    modes, which read the base's weights."""
    groups = [m for m in ("mlp", "q_proj", "k_proj", "v_proj") if m in recipe.modules]
    o_proj = "o_proj" in recipe.modules
    mode = "hidden" if recipe.gate_mode == "hidden_last" else recipe.gate_mode
    if mode in ("random", "uniform_random"):
        # o_proj draws from a seed of its own, so adding it leaves the other routers unchanged
        routers = dict(zip(groups, router_init.random_draws(mode, len(groups), *shape, context.seed,
                                                            recipe.scale)))
        if o_proj:
            routers["o_proj"] = router_init.random_draws(mode, 1, shape[0], shape[1], o_proj_width,
                                                         derive_seed(context.seed, "o_proj-router"), recipe.scale)[0]
        return _Drawn(routers)
    return _PromptRouters(mode, context.models[recipe.base], recipe, shape[0], groups, o_proj, where)


class _PromptRouters:
    """Routers of a prompt-based mode, computed when the engine writes the first of them, once
    for all (under a lock: the engine computes tensors in several threads) and on every core;
    so validate and --dry-run read no weight. The tokenizer, which is not weights, is loaded
    at plan time, so that a missing one is reported before anything is written."""

    def __init__(self, mode, base, recipe: Recipe, layers: int, groups: list, o_proj: bool, where: str):
        self.mode, self.base, self.recipe, self.layers = mode, base, recipe, layers
        self.groups, self.o_proj, self.where = groups, o_proj, where
        self.tokenizer = router_init.load_tokenizer(base, where)
        self.routers = None
        self.lock = threading.Lock()

    def __contains__(self, group: str) -> bool:
        return group in self.groups or (group == "o_proj" and self.o_proj)

    def get(self, group: str):
        with self.lock:
            if self.routers is None:
                self.routers = self._compute()
            return self.routers[group]

    def _places(self) -> dict:
        """Which state each router group is initialised from (routers.PLACES)."""
        own = self.recipe.hidden_source == "router_input" and self.mode != "cheap_embed"
        places = {group: ("mlp_input" if group == "mlp" else "attn_input") if own else "residual"
                  for group in self.groups}
        if self.o_proj:
            places["o_proj"] = "o_proj"
        return places

    def _compute(self) -> dict:
        from mixcli.engine import all_cores

        recipe = self.recipe
        places = self._places()
        with all_cores():
            found, repaired = router_init.compute(self.mode, self.base, self.tokenizer, recipe.positive,
                                                  recipe.negative, self.layers, recipe.hidden_dtype,
                                                  tuple(dict.fromkeys(places.values())), self.where)
        ending = router_init.common_last_token(self.tokenizer, [p for ps in recipe.positive for p in ps],
                                               router_init.specials_of(self.base, self.tokenizer))
        cause = (f"every prompt ends in the token {ending!r}, whose state there is the same for every expert"
                 if ending is not None else "the experts' prompts end in the same state there")
        for place, layers in repaired.items():
            worst = max(layers.values())
            warn(f"{self.where}: {place} router rows of layers {sorted(layers)} were near-identical at the last "
                 f"token (condition number {worst:.1e}: {cause}); those layers use the mean over all prompt "
                 "tokens instead (as gate_mode = \"hidden_avg\")")
        for place, routers in found.items():
            bad = router_init.nearly_parallel(routers)
            if bad:
                warn(f"{self.where}: {place} router rows of layers {bad} are nearly parallel (condition number "
                     "> 5): the experts' prompts give similar states there, so routing will barely tell the "
                     "experts apart; add prompts that differ more, or negative_prompts")
        return {group: found[place] for group, place in places.items()}


class _Drawn:
    """Routers drawn at plan time (random modes: no weight read), with the interface of
    :class:`_PromptRouters`."""

    def __init__(self, routers: dict):
        self.routers = routers

    def __contains__(self, group: str) -> bool:
        return group in self.routers

    def get(self, group: str):
        return self.routers[group]


class _Piece:
    """One expert's source tensor, cast, with optional seeded noise and residual scale."""

    def __init__(self, ckpt, name, noise=0.0, residual=None, seed=0):
        self.ckpt, self.name, self.noise, self.residual, self.seed = ckpt, name, noise, residual, seed

    def load(self, dtype):
        import torch

        tensor = self.ckpt.tensor(self.name).to(dtype)
        if self.noise:
            generator = torch.Generator().manual_seed(self.seed)
            tensor = tensor + self.noise * torch.randn(tensor.shape, generator=generator, dtype=dtype)
        if self.residual is not None and self.residual != 1.0:
            tensor = tensor * self.residual
        return tensor


class _Expert:
    def __init__(self, piece, code):
        self.piece, self.code = piece, code

    def __call__(self):
        from mixcli.safetensors_io import torch_dtype

        return self.piece.load(torch_dtype(self.code))


class _Fused:
    """``[E, rows, cols]``: per expert, its pieces stacked along the rows (gate then up)."""

    def __init__(self, pieces: list[list[_Piece]], shape, code):
        self.pieces, self.shape, self.code = pieces, shape, code

    def __call__(self):
        import torch

        from mixcli.safetensors_io import torch_dtype

        dtype = torch_dtype(self.code)
        out = torch.empty(self.shape, dtype=dtype)
        for e, parts in enumerate(self.pieces):
            row = 0
            for piece in parts:
                tensor = piece.load(dtype)
                out[e, row:row + tensor.shape[0]].copy_(tensor)
                row += tensor.shape[0]
        return out


class _Router:
    def __init__(self, routers, group: str, layer: int, code: str):
        self.routers, self.group, self.layer, self.code = routers, group, layer, code

    def __call__(self):
        from mixcli.safetensors_io import torch_dtype

        return self.routers.get(self.group)[self.layer].to(torch_dtype(self.code)).contiguous()


def build_plan(context, recipe: Recipe, method: str) -> OutputPlan:
    where = f"{context.project.where}: [method]"
    check_recipe(context, recipe, where)
    check_models(context, recipe, where)
    base = context.models[recipe.base]
    cfg = base.config
    layers_count = base.num_layers
    hidden = cfg["hidden_size"]
    count, k = len(recipe.experts), recipe.k
    mixed = set(range(layers_count)) if recipe.layers is None else set(recipe.layers)
    custom = is_custom(recipe.modules, recipe.layers, cfg)
    layout = recipe.layout or native_layout()
    names = Names(layout, custom)
    dtype = (context.project.out_dtype or context.project.dtype or cfg.get("dtype") or cfg.get("torch_dtype")
             or "float32")
    code = CODES.get(dtype, "F32")
    stem_plan = stem_sources(context, recipe, where)  # checks stem parameters before any read
    if count & (count - 1):
        warn(f"{where}: {count} experts is not a power of two; llama.cpp refuses such models")
    if cfg.get("sliding_window") and cfg.get("sliding_window") < cfg.get("max_position_embeddings", 0):
        warn(f"{where}: the base uses a sliding window of {cfg['sliding_window']} tokens; the Mixtral output "
             "attends to the whole context (sliding_window = None), so outputs differ beyond that length")

    o_proj_width = base.tensors[Names.attention(0, "o_proj")].shape[1]
    routers = routers_for(context, recipe, (layers_count, count, hidden), o_proj_width, where)
    mlp_routers = routers
    if "mlp" not in routers:  # a stock Mixtral block still needs a router; custom dense MLPs do not
        mlp_routers = _Drawn({"mlp": router_init.random_draws("uniform_random", 1, layers_count, count, hidden,
                                                              derive_seed(context.seed, "mlp-router"))[0]})
    tensors: list[OutputTensor] = []

    def piece(slot: int, name: str, layer: int, part: str, noisy: bool = True) -> _Piece:
        ckpt = context.models[recipe.experts[slot]]
        noise = recipe.noise[slot] if noisy and recipe.noise else 0.0
        residual = recipe.residual[slot] if noisy and recipe.residual and part == "down_proj" else None
        return _Piece(ckpt, name, noise, residual, derive_seed(context.seed, "noise", name, slot))

    def base_piece(name: str) -> _Piece:
        return _Piece(base, name)

    arch = layout_of(base.config)
    for tensor_name in sorted(base.tensors, key=lambda n: _order(n, arch)):
        split = arch.split(tensor_name)
        layer = split[1] if split else None
        template = split[0] if split else ""
        proj = template.split(".")[-2] if template.startswith("model.layers.{}.self_attn.") else None
        if template.startswith("model.layers.{}.mlp."):
            moe_here = not custom or ("mlp" in recipe.modules and layer in mixed)
            if moe_here:
                continue  # written below, once per layer
        elif proj in recipe.modules and layer in mixed:
            for slot in range(count):
                source = piece(slot, tensor_name, layer, proj, noisy=False)
                out = names.attention_expert(layer, proj, slot)
                tensors.append(OutputTensor(out, base.tensors[tensor_name].shape, code, _Expert(source, code),
                                            [(source.ckpt, tensor_name)],
                                            {"kind": "expert", "expert": slot, "source": recipe.experts[slot]}))
            continue
        tensors.append(stem_tensor(stem_plan, tensor_name, code, context))

    head = head_name(base)
    if (head is not None and head not in base.tensors and stem_plan.kind != "base"
            and any(head in ckpt.tensors for ckpt in stem_plan.sources)):
        # a tied base and untied experts: the merged stem has a head, tied ones giving their embedding
        tensors.append(stem_tensor(stem_plan, head, code, context))

    for layer in range(layers_count):
        if custom and not ("mlp" in recipe.modules and layer in mixed):
            continue
        sources = {}
        for slot in range(count):
            for part in MLP_PARTS:
                name = Names.dense(layer, part)
                # a layer outside `layers` gets the base's MLP in every slot: dense behaviour
                sources[slot, part] = piece(slot, name, layer, part) if layer in mixed else base_piece(name)
        inter = base.tensors[Names.dense(layer, "gate_proj")].shape[0]
        details = {"kind": "expert", "sources": [recipe.experts[s] if layer in mixed else recipe.base
                                                 for s in range(count)]}
        if layout == "v5":
            gate_up, down = names.fused(layer)
            pieces = [[sources[s, "gate_proj"], sources[s, "up_proj"]] for s in range(count)]
            reads = [(p.ckpt, p.name) for parts in pieces for p in parts]
            tensors.append(OutputTensor(gate_up, (count, 2 * inter, hidden), code,
                                        _Fused(pieces, (count, 2 * inter, hidden), code), reads, details))
            pieces = [[sources[s, "down_proj"]] for s in range(count)]
            tensors.append(OutputTensor(down, (count, hidden, inter), code, _Fused(pieces, (count, hidden, inter),
                                        code), [(p[0].ckpt, p[0].name) for p in pieces], details))
        else:
            for slot in range(count):
                for part in MLP_PARTS:
                    source = sources[slot, part]
                    shape = base.tensors[source.name].shape
                    tensors.append(OutputTensor(names.expert(layer, slot, part), shape, code, _Expert(source, code),
                                                [(source.ckpt, source.name)], details))
        tensors.append(OutputTensor(names.router(layer), (count, hidden), code,
                                    _Router(mlp_routers, "mlp", layer, code), [],
                                    {"kind": "router", "gate_mode": recipe.gate_mode}))
    for proj in ATTENTION:
        if proj not in recipe.modules:
            continue
        for layer in sorted(mixed):
            width = o_proj_width if proj == "o_proj" else hidden
            tensors.append(OutputTensor(names.attention_router(layer, proj), (count, width), code,
                                        _Router(routers, proj, layer, code), [],
                                        {"kind": "router", "gate_mode": recipe.gate_mode}))

    config = output_config(cfg, experts=count, k=k, dtype=output_dtype_name(code), modules=recipe.modules,
                           layers=recipe.layers, aux_loss_coef=recipe.aux_loss_coef)
    if head is not None and any(t.name == head for t in tensors):
        config["tie_word_embeddings"] = False  # a written head must not be replaced by the embedding
    check_names(config, {t.name for t in tensors}, layout, where, recipe.base)
    counts = parameter_counts(tensors, names, count, k)
    info = {"method": method, "experts": recipe.experts, "base": recipe.base, "gate_mode": recipe.gate_mode,
            "modules": list(recipe.modules), "layers": sorted(mixed), "layout": layout, "stem": recipe.stem,
            "parameters": counts}
    return OutputPlan(config=config, tensors=tensors, donor=base,
                      extra_files={"moe_info.json": (json.dumps(info, indent=2) + "\n").encode()})


def _order(name: str, arch):
    split = arch.split(name)
    return (1, split[1], name) if split else (0 if arch.role(name) == "pre" else 2, 0, name)

