"""The output config of a layer map: layer count, per-layer lists re-indexed, layer-threshold
fields recomputed or refused (never a config whose per-layer metadata disagrees with the layers)."""

from __future__ import annotations

import copy

from mixcli import MixcliError

COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
# fields listing layer indices: remapped through the map
INDEX_LIST_FIELDS = ("mlp_only_layers", "cross_attention_layers", "attn_layer_indices", "swa_layers")


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


def layer_count(config: dict) -> int | None:
    for key in COUNT_KEYS:
        if isinstance(config.get(key), int) and not isinstance(config.get(key), bool):
            return config[key]
    return None


def _refuse(key: str, where: str) -> MixcliError:
    return MixcliError(f"{where}: config.json field '{key}' says which layers behave differently and "
                       "cannot be recomputed for this layer map; choose layers that keep its pattern "
                       "or use models without it")


def map_config(configs: dict[str, dict], base: str, layers: list[tuple[str, int]], where: str) -> dict:
    """``configs[base]`` with every layer-dependent field following ``layers`` (model, index).

    ``configs`` holds each source model's config; per-layer values come from the model each
    output layer is taken from.
    """
    out = copy.deepcopy(configs[base])
    _map_level(out, configs, base, layers, where, ())
    return out


def _sub(config: dict, path: tuple) -> dict:
    for key in path:
        config = config.get(key) or {}
    return config


def _map_level(out: dict, configs: dict, base: str, layers: list, where: str, path: tuple) -> None:
    levels = {name: _sub(cfg, path) for name, cfg in configs.items()}
    own = layer_count(levels[base])
    expected = _effective_count(configs[base])
    if own is not None and own != expected:
        return  # a sub-model with layers of its own (a vision tower): not what the map describes
    identity = {name for name, _ in layers} == {base} and [i for _, i in layers] == list(range(own or 0))
    counts = {name: layer_count(level) for name, level in levels.items()}
    for key, value in list(out.items()):
        full = ".".join(path + (key,))
        if isinstance(value, dict) and key.endswith("_config"):
            _map_level(value, configs, base, layers, where, path + (key,))
        elif key in INDEX_LIST_FIELDS and isinstance(value, list):
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
        elif key in PREFIX_FIELDS and isinstance(value, int) and not isinstance(value, bool) and not identity:
            flags = [_flag(PREFIX_FIELDS[key], levels[name], i, full, where) for name, i in layers]
            count = flags.index(False) if False in flags else len(flags)
            if any(flags[count:]):
                raise _refuse(full, where)
            out[key] = count
        elif key in PERIOD_FIELDS and isinstance(value, int) and not isinstance(value, bool) and not identity:
            flags = [_flag(PERIOD_FIELDS[key], levels[name], i, full, where) for name, i in layers]
            if flags != [PERIOD_FIELDS[key](out, k) if value else None for k in range(len(layers))]:
                raise _refuse(full, where)
    for key in COUNT_KEYS:
        if isinstance(out.get(key), int) and not isinstance(out.get(key), bool):
            out[key] = len(layers)


def _effective_count(config: dict) -> int | None:
    count = layer_count(config)
    text = config.get("text_config")
    return count if count is not None or not isinstance(text, dict) else layer_count(text)


def _flag(predicate, config: dict, index: int, full: str, where: str):
    try:
        return predicate(config, index)
    except (KeyError, TypeError, ZeroDivisionError):
        raise _refuse(full, where) from None
