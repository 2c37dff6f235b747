"""The layer map shared by frankenmerge and depth_upscaling, and the output plan it gives.

A layer map says where every output tensor comes from: the pre-layer tensors (embeddings)
from ``embed_from``, output layer ``k`` from layer ``index`` of ``model`` (optionally scaled),
the post-layer tensors (final norm, ``lm_head``) from ``head_from``. Planning reads configs
and safetensors headers only; each output tensor is one source tensor read when written.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from mixcli import MixcliError
from mixcli.errors import closest
from mixcli.architecture import check_layer_count, head_name, head_source, layer_templates, map_config, tensor_role
from mixcli.params import NOTHING, ParamSpec, check_setting, evaluate
from mixcli.plan import OutputPlan, OutputTensor, output_dtype_name, set_dtype
from mixcli.safetensors_io import FLOATING

SCALE = ParamSpec(name="scale", field="scale", type=float, default=None, help="multiply the tensors",
                  per_model=True, min=None, max=None, min_exclusive=False, choices=None)
FORMAT = "mixcli-layer-map/1"


@dataclass
class LayerEntry:
    model: str
    index: int
    scale: Any = None  # a checked setting: scalar, gradient or filtered list; None = unscaled
    position: float = 1.0  # gradient position inside its slice (p = j / (len - 1); 1 for one layer)


@dataclass
class LayerMap:
    embed_from: str
    head_from: str
    layers: list[LayerEntry]
    embed_scale: Any = None
    head_scale: Any = None
    details: dict = field(default_factory=dict)  # extra metadata for layer_map.json


def check_scale(setting: Any, where: str) -> Any:
    """Validate a ``scale`` setting (number, gradient or filtered list) before any read."""
    return None if setting is None else check_setting(SCALE, setting, where)


def scale_value(setting: Any, name: str, position: float, where: str) -> float | None:
    if setting is None:
        return None
    value = evaluate(setting, name, position)
    return None if value is NOTHING else SCALE.check(value, where)


class _Copy:
    """Reads one source tensor; scales it out of place when asked (a class: plans stay readable)."""

    def __init__(self, ckpt, name: str, scale: float | None):
        self.ckpt, self.name, self.scale = ckpt, name, scale

    def __call__(self):
        tensor = self.ckpt.tensor(self.name)  # a read-only mapped view, written as is
        if self.scale is None or not tensor.is_floating_point():
            return tensor
        return tensor * self.scale


def _copy(ckpt, in_name: str, out_name: str, scale: float | None, source: str) -> OutputTensor:
    info = ckpt.tensors[in_name]
    details = {"source": source, "tensor": in_name}
    if scale is not None:
        details["scale"] = scale
    return OutputTensor(out_name, info.shape, info.dtype, _Copy(ckpt, in_name, scale), [(ckpt, in_name)], details)


DTYPE_CODES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}


class _Cast:
    """A copied tensor in the recipe's ``[method] dtype``."""

    def __init__(self, compute, code: str):
        self.compute, self.code = compute, code

    def __call__(self):
        from mixcli.safetensors_io import torch_dtype

        return self.compute().to(torch_dtype(self.code))


def cast_floating(tensors: list[OutputTensor], config: dict, dtype: str) -> None:
    """``[method] dtype``: every floating tensor written in ``dtype``, and the config saying so
    (copying the inputs' dtype would write a model other than the recipe's)."""
    code = DTYPE_CODES[dtype]
    for tensor in tensors:
        if tensor.dtype in FLOATING and tensor.dtype != code:
            tensor.compute, tensor.dtype, tensor.fill = _Cast(tensor.compute, code), code, None
    set_dtype(config, dtype)


def model_named(value, models: dict, where: str) -> str:
    """``value`` when it names one of ``models``; a one-line error listing them otherwise."""
    if not isinstance(value, str) or value not in models:
        raise MixcliError(f"{where}: no model named {value!r} in [models]"
                          f"{closest(str(value), models)}; use one of: {', '.join(models)}")
    return value


def layer_entries(context, allowed: tuple, example: str, empty_hint: str):
    """``(n, where, entry)`` for each table of ``[method] layers``, after the checks every list of
    layer entries shares: not empty, each a table, no key outside ``allowed``."""
    where = f"{context.project.where}: [method] layers"
    entries = context.params["layers"]
    if not entries:
        raise MixcliError(f"{where} is empty; {empty_hint}")
    for n, entry in enumerate(entries, 1):
        here = f"{where} entry {n}"
        if not isinstance(entry, dict):
            raise MixcliError(f"{here} must be a table like {example}, got {entry!r}")
        unknown = [k for k in entry if k not in allowed]
        if unknown:
            raise MixcliError(f"{here}: unknown key '{unknown[0]}'{closest(unknown[0], allowed)}; "
                              f"allowed: {', '.join(allowed)}")
        yield n, here, entry


def check_compatible(models: dict, names: list[str], where: str) -> None:
    """All models share one architecture and width (configs and headers only)."""
    first = names[0]
    ref = models[first]
    ref_layers, ref_others = layer_templates(ref)
    ref_layer = ref_layers.get(0, set())
    for name in names[1:]:
        ckpt = models[name]
        kind, theirs = ref.config.get("model_type"), ckpt.config.get("model_type")
        if kind != theirs:
            raise MixcliError(f"{where}: model '{name}' is a '{theirs}' but '{first}' is a '{kind}'; "
                              "a layer map needs models of one architecture")
        layers, _ = layer_templates(ckpt)
        pairs = [(n, n) for n in ref_others if n in ckpt.tensors]
        pairs += [(t.format(0), t.format(0)) for t in sorted(ref_layer & layers.get(0, set()))]
        for a, b in pairs:
            shape_a, shape_b = list(ref.tensors[a].shape), list(ckpt.tensors[b].shape)
            if shape_a != shape_b:
                raise MixcliError(f"{where}: tensor '{a}' has shape {shape_a} in model '{first}' but "
                                  f"{shape_b} in model '{name}'; the models differ in width or "
                                  "architecture and their layers cannot be stacked")


def plan_layer_map(context, lmap: LayerMap, method: str, where: str) -> OutputPlan:
    """The output plan of ``lmap`` over ``context.models`` (a :class:`mixcli.plan.BuildContext`)."""
    models = context.models
    used = list(dict.fromkeys([lmap.embed_from] + [e.model for e in lmap.layers] + [lmap.head_from]))
    for name in used:
        if models[name].num_layers is None:
            raise MixcliError(f"{where}: model '{name}' has no layer count in its config.json "
                              "(num_hidden_layers); it cannot be used in a layer map")
        check_layer_count(models[name], context.project.models[name].where)
    if not lmap.layers:
        raise MixcliError(f"{where}: the layer map selects no layers; give at least one layer")
    check_compatible(models, used, where)
    templates = {name: layer_templates(models[name]) for name in used}

    tensors: list[OutputTensor] = []
    embed = models[lmap.embed_from]
    for name in templates[lmap.embed_from][1]:
        if tensor_role(embed, name) == "pre":
            value = scale_value(lmap.embed_scale, name, 0.0, f"{where}, tensor '{name}'")
            tensors.append(_copy(embed, name, name, value, f"{lmap.embed_from}"))
    for k, entry in enumerate(lmap.layers):
        ckpt = models[entry.model]
        count = ckpt.num_layers
        if not 0 <= entry.index < count:
            raise MixcliError(f"{where}: layer {entry.index} of model '{entry.model}' is out of range: "
                              f"it has {count} layers (0..{count - 1})")
        layer_names = templates[entry.model][0].get(entry.index)
        if not layer_names:
            raise MixcliError(f"{where}: model '{entry.model}' stores no tensors for layer {entry.index}")
        for template in sorted(layer_names):
            in_name = template.format(entry.index)
            value = scale_value(entry.scale, in_name, entry.position, f"{where}, tensor '{in_name}'")
            tensors.append(_copy(ckpt, in_name, template.format(k), value, f"{entry.model}.{entry.index}"))
    head = models[lmap.head_from]
    post = [n for n in templates[lmap.head_from][1] if tensor_role(head, n) in ("post", "head")]
    head_tensor = head_name(head)
    if lmap.head_from != lmap.embed_from and head_tensor is not None and head_tensor not in post:
        alias = head_source(head)  # a tied head model: its embedding is its head
        if alias is not None:
            value = scale_value(lmap.head_scale, alias, 0.0, f"{where}, tensor '{alias}'")
            tensors.append(_copy(head, alias, head_tensor, value, lmap.head_from))
    for name in post:
        value = scale_value(lmap.head_scale, name, 0.0, f"{where}, tensor '{name}'")
        tensors.append(_copy(head, name, name, value, lmap.head_from))

    configs = {name: models[name].config for name in used}
    config = map_config(configs, lmap.embed_from, [(e.model, e.index) for e in lmap.layers], where)
    floating = [t.dtype for t in tensors if t.dtype in ("F32", "F16", "BF16", "F64")]
    if context.project.dtype:
        cast_floating(tensors, config, context.project.dtype)
    elif floating:
        set_dtype(config, output_dtype_name(Counter(floating).most_common(1)[0][0]))
    if head_tensor is not None and any(t.name == head_tensor for t in tensors):
        config["tie_word_embeddings"] = False  # a written head must not be replaced by the embedding
    extra = {"layer_map.json": (json.dumps(layer_map_json(context, lmap, method), indent=2) + "\n").encode()}
    return OutputPlan(config=config, tensors=tensors, donor=models[lmap.embed_from], extra_files=extra)


def layer_map_json(context, lmap: LayerMap, method: str) -> dict:
    """The machine-readable layer map written beside the weights (re-applying it reproduces them)."""
    refs = context.project.models

    def entry(e: LayerEntry) -> dict:
        out = {"model": e.model, "layer": e.index}
        if e.scale is not None:
            out["scale"] = e.scale
            out["position"] = e.position
        return out

    data = {
        "format": FORMAT,
        "method": method,
        "models": {name: refs[name].path for name in dict.fromkeys(
            [lmap.embed_from] + [e.model for e in lmap.layers] + [lmap.head_from])},
        "embed_from": lmap.embed_from,
        "head_from": lmap.head_from,
        "num_layers": len(lmap.layers),
        "layers": [entry(e) for e in lmap.layers],
    }
    if lmap.embed_scale is not None:
        data["embed_scale"] = lmap.embed_scale
    if lmap.head_scale is not None:
        data["head_scale"] = lmap.head_scale
    data.update(lmap.details)
    return data
