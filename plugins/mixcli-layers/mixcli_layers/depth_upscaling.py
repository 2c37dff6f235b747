"""depth_upscaling: one model, its layers re-stacked by a layer spec (SOLAR, arXiv 2312.15166).

    [method]
    name = "depth_upscaling"
    layers = ["0:24", "8:32"]        # SOLAR on a 32-layer model: 48 layers

The spec follows :mod:`mixcli_layers.layer_spec` (parsed, never evaluated). Embeddings and
head come from the model itself. The written model numbers its layers 0..L'-1, so a fresh
``from_pretrained`` gives each layer its own KV-cache slot; :func:`upscale_model` does the
same for a model already in memory.
"""

from __future__ import annotations

from dataclasses import dataclass

from mixcli import MixcliError, Upscaler, param

from ._layermap import LayerEntry, LayerMap, check_scale, plan_layer_map
from .layer_spec import parse_layer_spec


@dataclass
class Params:
    layers: list = param(help="layer spec: items 5, \"0:24\", \"::2\", \"range(11, -1, -1)\" or [0, 24], "
                              "e.g. [\"0:24\", \"8:32\"] (SOLAR); see the mixcli-layers README")
    scale: float | None = param(None, help="multiply the copied layers' tensors: a number, a gradient "
                                           "over the output layers or a filtered list")


def build(context):
    (name, ckpt), = context.models.items()
    where = f"{context.project.where}: [method]"
    count = ckpt.num_layers
    if count is None:
        raise MixcliError(f"{context.project.models[name].where}: model '{name}' has no layer count in its "
                          "config.json (num_hidden_layers); depth_upscaling cannot apply")
    indices = parse_layer_spec(context.params["layers"], count, f"{where} layers")
    scale = check_scale(context.project.params.get("scale"), f"{where} scale")
    last = max(len(indices) - 1, 1)
    layers = [LayerEntry(name, i, scale, k / last if len(indices) > 1 else 1.0) for k, i in enumerate(indices)]
    lmap = LayerMap(name, name, layers, details={"layer_spec": context.params["layers"]})
    return plan_layer_map(context, lmap, "depth_upscaling", where)


def renumber_layers(model) -> int:
    """Set every per-layer index attribute (``layer_idx``) to the module's output position.

    Works on any model whose decoder layers live in a ``ModuleList`` named ``layers``/``h``/
    ``blocks``; returns how many attributes were set. Needed whenever layers are duplicated or
    reordered in memory: otherwise copies share one KV-cache slot and cached generation drifts.
    """
    import torch

    count = 0
    for module in model.modules():
        for attr in ("layers", "h", "blocks"):
            stack = getattr(module, attr, None)
            if not isinstance(stack, torch.nn.ModuleList):
                continue
            for position, layer in enumerate(stack):
                for sub in layer.modules():
                    for key in ("layer_idx", "layer_index"):
                        if isinstance(getattr(sub, key, None), int):
                            setattr(sub, key, position)
                            count += 1
    return count


def upscale_model(model, layers):
    """An in-memory depth-upscaled copy of a transformers causal LM (the input is left as is).

    ``layers`` is a layer spec (same grammar as the project). Layers are deep copies (no
    shared parameters), renumbered with :func:`renumber_layers`; the config's layer count and
    per-layer lists follow the map.
    """
    import copy

    import torch

    from mixcli.architecture import map_config

    stack = _decoder_layers(model)
    indices = parse_layer_spec(layers, len(stack), "layers")
    original = model.config.to_dict()
    config = map_config({"m": original}, "m", [("m", i) for i in indices], "layers")
    out = copy.deepcopy(model)
    out_stack = _decoder_layers(out)
    fresh = torch.nn.ModuleList(copy.deepcopy(stack[i]) for i in indices)
    for attr in ("layers", "h", "blocks"):
        parent = next((m for m in out.modules() if getattr(m, attr, None) is out_stack), None)
        if parent is not None:
            setattr(parent, attr, fresh)
            break
    for key, value in config.items():
        if original.get(key) != value and not isinstance(value, dict) and hasattr(out.config, key):
            setattr(out.config, key, value)
    renumber_layers(out)
    return out


def _decoder_layers(model):
    import torch

    for module in model.modules():
        for attr in ("layers", "h", "blocks"):
            stack = getattr(module, attr, None)
            if isinstance(stack, torch.nn.ModuleList) and len(stack):
                return stack
    raise MixcliError("upscale_model: no ModuleList of decoder layers (layers, h or blocks) in the model")


METHOD = Upscaler(
    name="depth_upscaling",
    summary="Re-stack one model's layers by a layer spec (SOLAR depth up-scaling)",
    build=build,
    params=Params,
    min_inputs=1,
    max_inputs=1,
    example={"layers": [":", ":"]},  # every layer twice; SOLAR on 32 layers: ["0:24", "8:32"]
)
