"""What mixcli knows about model architectures, in one place.

An :class:`ArchitectureLayout` says, for the model types it describes, which tensors are
per-layer (and their layer index), which are input embeddings, which is the output head, and
which config fields describe layers. Every planner (tensor-wise merges and ``[[slices]]``,
the layer maps of mixcli-layers, the MoE builders) asks this module instead of matching
names itself:

* :func:`layout_of` — the layout for a config (plugins' layouts before the built-in ones);
* :func:`split_layer_name`, :func:`layer_templates`, :func:`tensor_role` — tensor roles:
  ``"layer"``, ``"pre"`` (embeddings and whatever precedes the layers), ``"head"`` (the output
  embedding) or ``"post"`` (the final norm and whatever follows the layers);
* :func:`head_source`, :func:`is_tied` — tied embeddings: a tied model's head is its input
  embedding;
* :func:`layer_count`, :func:`check_layer_count` — the config's layer count, checked against
  the tensors;
* :func:`map_config` — the config of a layer map (output layer ``k`` = layer ``i`` of model
  ``m``): layer count, per-layer lists and layer-index fields follow the map.

Layouts are registered through the ``register_architecture_layouts`` hook; the generic one
every transformers model falls back to comes from :mod:`mixcli.default_plugins.layouts`.
Nothing here imports torch.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from functools import lru_cache

from .errors import MixcliError

COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
# config fields listing layer indices: remapped through a layer map
INDEX_LIST_FIELDS = ("mlp_only_layers", "cross_attention_layers", "attn_layer_indices", "swa_layers")


@dataclass(frozen=True)
class ArchitectureLayout:
    """How the models of some ``model_type`` values name their tensors and describe layers.

    ``layer_pattern`` is a regular expression found (``re.search``) in every per-layer tensor
    name; its group ``index`` is the layer number. ``embeddings`` are the input embedding names
    in order of preference (a tied model's head is the first one it stores); ``head`` is the
    output embedding, absent from tied models. A non-layer tensor whose name contains one of
    ``pre_layer_hints`` comes before the layers, any other after them. ``index_list_fields``
    adds config fields that list layer indices to :data:`INDEX_LIST_FIELDS`.
    """

    name: str
    summary: str
    model_types: tuple[str, ...] = ()  # () describes any model: a fallback
    layer_pattern: str = r"(^|\.)(layers|layer|h|blocks)\.(?P<index>\d+)\."
    embeddings: tuple[str, ...] = ()
    head: str | None = "lm_head.weight"
    pre_layer_hints: tuple[str, ...] = ()
    index_list_fields: tuple[str, ...] = ()
    kind: str = "layout"

    def split(self, name: str) -> tuple[str, int] | None:
        """``model.layers.3.mlp.up_proj.weight`` → (``model.layers.{}.mlp.up_proj.weight``, 3)."""
        match = _compiled(self.layer_pattern).search(name)
        if match is None:
            return None
        start, end = match.span("index")
        return name[:start] + "{}" + name[end:], int(match.group("index"))

    def role(self, name: str) -> str:
        """``"layer"``, ``"head"``, ``"pre"`` or ``"post"``."""
        if self.split(name) is not None:
            return "layer"
        if name == self.head:
            return "head"
        if name in self.embeddings or any(hint in name for hint in self.pre_layer_hints):
            return "pre"
        return "post"


@lru_cache(maxsize=None)
def _compiled(pattern: str) -> re.Pattern:
    return re.compile(pattern)


def layout_of(config: dict | None) -> ArchitectureLayout:
    """The registered layout for ``config['model_type']``, else the fallback (``model_types=()``)."""
    from .plugins import get_registry

    layouts = list(get_registry().layouts.values())[::-1]  # plugins' layouts before the built-ins
    model_type = (config or {}).get("model_type")
    found = (next((lay for lay in layouts if model_type in lay.model_types), None)
             or next((lay for lay in layouts if not lay.model_types), None))
    if found is None:
        raise MixcliError(f"no architecture layout describes model_type '{model_type}'; install a plugin "
                          "that registers one (register_architecture_layouts)")
    return found


def split_layer_name(name: str, layout: ArchitectureLayout | None = None) -> tuple[str, int] | None:
    """(template, layer index) of a per-layer tensor name, else None."""
    return (layout or layout_of(None)).split(name)


def layer_templates(ckpt) -> tuple[dict[int, set[str]], list[str]]:
    """Per layer index the set of name templates, and the sorted names outside the layers."""
    layout = layout_of(ckpt.config)
    layers: dict[int, set[str]] = {}
    others = []
    for name in ckpt.tensors:
        split = layout.split(name)
        if split is None:
            others.append(name)
        else:
            layers.setdefault(split[1], set()).add(split[0])
    return layers, sorted(others)


def tensor_role(ckpt, name: str) -> str:
    return layout_of(ckpt.config).role(name)


def is_pre_layer(name: str, layout: ArchitectureLayout | None = None) -> bool:
    return (layout or layout_of(None)).role(name) == "pre"


def head_name(ckpt) -> str | None:
    """The output head's tensor name in ``ckpt``'s architecture (stored or not)."""
    return layout_of(ckpt.config).head


def is_tied(ckpt) -> bool:
    """The model stores no head and its input embedding serves as one."""
    layout = layout_of(ckpt.config)
    if layout.head is None or layout.head in ckpt.tensors:
        return False
    if _tie_setting(ckpt.config) is False:
        return False
    return any(name in ckpt.tensors for name in layout.embeddings)


def head_source(ckpt) -> str | None:
    """The tensor that is ``ckpt``'s head: the stored head, or the embedding of a tied model."""
    layout = layout_of(ckpt.config)
    if layout.head is not None and layout.head in ckpt.tensors:
        return layout.head
    if is_tied(ckpt):
        return next(name for name in layout.embeddings if name in ckpt.tensors)
    return None


def _tie_setting(config: dict):
    if "tie_word_embeddings" in config:
        return config["tie_word_embeddings"]
    text = config.get("text_config")
    return text.get("tie_word_embeddings") if isinstance(text, dict) else None


def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def layer_count(config: dict, nested: bool = True) -> int | None:
    """The config's layer count (``num_hidden_layers``...; in ``text_config`` when ``nested``)."""
    if not nested:
        return next((config[key] for key in COUNT_KEYS if _int(config.get(key))), None)
    return _count_and_field(config)[0]


def _count_and_field(config: dict) -> tuple[int | None, str | None]:
    for key in COUNT_KEYS:
        if _int(config.get(key)):
            return config[key], key
    text = config.get("text_config")
    if isinstance(text, dict):
        count, key = _count_and_field(text)
        return count, None if key is None else f"text_config.{key}"
    return None, None


def check_layer_count(ckpt, where: str) -> None:
    """The layer count of ``ckpt``'s config is a stack of layers 0..N-1 among its tensors."""
    count, key = _count_and_field(ckpt.config)
    if count is None:
        return
    layout = layout_of(ckpt.config)
    stacks: dict[str, set[int]] = {}  # a prefix like "model.layers." -> the indices under it
    for name in ckpt.tensors:
        split = layout.split(name)
        if split is not None:
            stacks.setdefault(split[0].split("{}", 1)[0], set()).add(split[1])
    if not stacks or any(indices == set(range(count)) for indices in stacks.values()):
        return
    prefix, indices = max(stacks.items(), key=lambda item: len(item[1]))
    held = f"{len(indices)} layers ({prefix}{min(indices)}..{max(indices)})"
    raise MixcliError(f"{where}: {ckpt.path / 'config.json'} says {key} = {count} but its tensors hold "
                      f"{held}; fix the config or the weights")


# ------------------------------------------------------------------ the config of a layer map

def _prefix(key, below):
    """A "first N layers" field: layer i has the property iff (i < N) == below."""
    return key, lambda cfg, i: (i < cfg[key]) == below


def _every(key, hit):
    return key, lambda cfg, i: hit(i, cfg[key]) if cfg[key] else None


# fields whose value says which layers do what; the predicate is what the field means for layer i
PREFIX_FIELDS = dict([
    _prefix("first_k_dense_replace", True),  # DeepSeek: layers < k are dense
    _prefix("max_window_layers", True),  # Qwen2/3: layers >= N use the sliding window
])
PERIOD_FIELDS = dict([
    _every("decoder_sparse_step", lambda i, n: (i + 1) % n == 0),  # Qwen-MoE
    _every("interleave_moe_layer_step", lambda i, n: (i + 1) % n == 0),  # Llama 4
    _every("sliding_window_pattern", lambda i, n: (i + 1) % n != 0),  # Gemma 2/3
    _every("global_attn_every_n_layers", lambda i, n: i % n == 0),  # ModernBERT
    _every("full_attention_interval", lambda i, n: (i + 1) % n == 0),
    _every("moe_layer_freq", lambda i, n: i % n == 0),  # DeepSeek
    ("attn_layer_period", lambda cfg, i: i % cfg["attn_layer_period"] == cfg.get("attn_layer_offset", 0)),
    ("attn_layer_offset", lambda cfg, i: i % cfg.get("attn_layer_period", 1) == cfg["attn_layer_offset"]),
    ("expert_layer_period", lambda cfg, i: i % cfg["expert_layer_period"] == cfg.get("expert_layer_offset", 0)),
    ("expert_layer_offset", lambda cfg, i: i % cfg.get("expert_layer_period", 1) == cfg["expert_layer_offset"]),
])


def _refuse(key: str, where: str) -> MixcliError:
    return MixcliError(f"{where}: config.json field '{key}' says which layers behave differently and "
                       "cannot be recomputed for this layer map; choose layers that keep its pattern "
                       "or use models without it")


def map_config(configs: dict[str, dict], base: str, layers: list[tuple[str, int]], where: str) -> dict:
    """``configs[base]`` with every layer-dependent field following ``layers`` (model, index).

    ``configs`` holds each source model's config; the per-layer value of output layer ``k``
    comes from the config of the model it is taken from, at that model's own index. Fields
    that cannot follow the map raise :class:`MixcliError` naming the field.
    """
    out = copy.deepcopy(configs[base])
    index_fields = INDEX_LIST_FIELDS + layout_of(configs[base]).index_list_fields
    _map_level(out, configs, base, layers, where, (), index_fields)
    return out


def _sub(config: dict, path: tuple) -> dict:
    for key in path:
        config = config.get(key) or {}
    return config


def _map_level(out: dict, configs: dict, base: str, layers: list, where: str, path: tuple,
               index_fields: tuple) -> None:
    levels = {name: _sub(cfg, path) for name, cfg in configs.items()}
    own = layer_count(levels[base], nested=False)
    expected = layer_count(configs[base])
    if own is not None and own != expected:
        return  # a sub-model with layers of its own (a vision tower): not what the map describes
    identity = {name for name, _ in layers} == {base} and [i for _, i in layers] == list(range(own or 0))
    counts = {name: layer_count(level, nested=False) for name, level in levels.items()}
    for key, value in list(out.items()):
        full = ".".join(path + (key,))
        if isinstance(value, dict) and key.endswith("_config"):
            _map_level(value, configs, base, layers, where, path + (key,), index_fields)
        elif key in index_fields and isinstance(value, list):
            out[key] = [k for k, (name, i) in enumerate(layers) if i in (levels[name].get(key) or [])]
        elif isinstance(value, list) and key != "architectures" and own and len(value) == own > 1:
            new = []
            for name, i in layers:
                theirs = levels[name].get(key)
                if not isinstance(theirs, list) or len(theirs) != counts[name]:
                    raise MixcliError(f"{where}: config.json field '{full}' has one entry per layer in "
                                      f"some models but not in '{name}'; the models must share one "
                                      "architecture")
                new.append(copy.deepcopy(theirs[i]))
            out[key] = new
        elif key in PREFIX_FIELDS and _int(value) and not identity:
            flags = [_flag(PREFIX_FIELDS[key], levels[name], i, full, where) for name, i in layers]
            count = flags.index(False) if False in flags else len(flags)
            if any(flags[count:]):
                raise _refuse(full, where)
            out[key] = count
        elif key in PERIOD_FIELDS and _int(value) and not identity:
            flags = [_flag(PERIOD_FIELDS[key], levels[name], i, full, where) for name, i in layers]
            if flags != [PERIOD_FIELDS[key](out, k) if value else None for k in range(len(layers))]:
                raise _refuse(full, where)
    for key in COUNT_KEYS:
        if _int(out.get(key)):
            out[key] = len(layers)


def _flag(predicate, config: dict, index: int, full: str, where: str):
    try:
        return predicate(config, index)
    except (KeyError, TypeError, ZeroDivisionError):
        raise _refuse(full, where) from None
