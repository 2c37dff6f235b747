"""Data-flow-space (DFS) candidates: a layer path turned into an ordinary recipe and a model.

A path is a sequence of steps (source model, layer index, input scale). The recipe is the
method ``layer_path`` of this plugin::

    [method]
    name = "layer_path"
    layers = [{ model = "a", layer = 0 }, { model = "b", layer = 2, scale = 0.8 }, ...]
    # embed_from = "a"   # default: the first model of [models]
    # head_from = "b"    # default: the model of the last step

Embeddings come from ``embed_from``, the final norm and head from ``head_from``, output layer
``k`` from the step's source layer, through mixcli-layers' layer map (configs and headers
only until the tensors are computed); ``[method] dtype`` casts the floating tensors. With every scale 1 the output is the stock architecture
(a frankenmerge of single layers). Any other scale gives the scaled decoder of
:mod:`mixcli_evolve.dfs_model`: the same tensors, ``model_type = "mixcli_dfs_<base>"`` and the
scales in ``config.layer_input_scales``. Either way ``mixcli merge`` writes it and
:func:`mixcli.inmemory.build_model` builds it in memory, with fresh layers numbered ``0..L-1``
(distinct KV-cache slots for repeated layers).

:func:`decode_indicator` turns Sakana's genome (an indicator over the source layers repeated
``repeats`` times, and a layer-to-layer scale matrix) into a path; :func:`path_recipe` a path
into the recipe dict that :func:`mixcli.project.project_from_dict` reads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mixcli import MixcliError, Upscaler, param

STEP_KEYS = ("model", "layer", "scale")


@dataclass(frozen=True)
class PathStep:
    """One position of a layer path: layer ``layer`` of ``model``, its input times ``scale``."""

    model: str
    layer: int
    scale: float = 1.0


def decode_indicator(indicator, layer_counts: dict[str, int], repeats: int = 1, scales=None) -> list[PathStep]:
    """The path of an indicator genome (spec §3.2).

    The layers of the models of ``layer_counts`` (name -> layer count, in order) are laid out
    one after the other (``M`` layers) and the sequence repeated ``repeats`` times (``T = M·r``
    slots); slot ``t`` is on the path when ``indicator[t] > 0``. With ``scales`` (an ``M×M``
    array-like over the laid-out layers), a step from layer ``i`` to layer ``j`` scales the input
    of ``j`` by ``scales[i][j]``; the first step has scale 1."""
    slots = [(name, index) for name, count in layer_counts.items() for index in range(count)]
    total = len(slots) * repeats
    values = [float(v) for v in indicator]
    if len(values) != total:
        raise MixcliError(f"layer path: the indicator has {len(values)} genes but {len(slots)} layers × "
                          f"{repeats} repeats = {total} slots")
    steps, previous = [], None
    for t, value in enumerate(values):
        if value <= 0:
            continue
        j = t % len(slots)
        scale = 1.0 if previous is None or scales is None else float(scales[previous][j])
        steps.append(PathStep(*slots[j], scale))
        previous = j
    return steps


def path_recipe(steps, models: dict[str, str], *, embed_from: str | None = None, head_from: str | None = None,
                output: str | None = None, dtype: str | None = None) -> dict:
    """The ``layer_path`` recipe of ``steps`` over ``models`` (name -> path): a dict for
    :func:`mixcli.project.project_from_dict`, listing only the models the path uses."""
    if not steps:
        raise MixcliError("layer path: the path is empty; at least one layer must be on")
    embed_from = embed_from or next(iter(models))
    head_from = head_from or steps[-1].model
    used = dict.fromkeys([embed_from, *(s.model for s in steps), head_from])
    layers = []
    for step in steps:
        entry = {"model": step.model, "layer": int(step.layer)}
        if float(step.scale) != 1.0:
            entry["scale"] = float(step.scale)
        layers.append(entry)
    method = {"name": "layer_path", "layers": layers, "embed_from": embed_from, "head_from": head_from}
    if dtype:
        method["dtype"] = dtype
    recipe = {"models": {name: models[name] for name in used}, "method": method}
    if output is not None:
        recipe["output"] = {"path": output}
    return recipe


@dataclass
class Params:
    layers: list = param(help="the path in order: {model = \"a\", layer = 3} per step, optionally with "
                              "scale = the factor on that layer's input (default 1)")
    embed_from: str | None = param(None, help="model whose embeddings are used (default: the first model)")
    head_from: str | None = param(None, help="model whose final norm and head are used (default: the "
                                             "last step's model)")


def read_steps(context) -> list[PathStep]:
    from mixcli_layers._layermap import layer_entries, model_named

    models = context.models
    steps = []
    for _, here, entry in layer_entries(context, STEP_KEYS, '{model = "a", layer = 0}',
                                        'list the path, e.g. [{model = "a", layer = 0}, ...]'):
        for key in ("model", "layer"):
            if key not in entry:
                raise MixcliError(f"{here}: '{key}' is missing")
        model = model_named(entry["model"], models, f"{here} model")
        layer = entry["layer"]
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
            raise MixcliError(f"{here}: layer must be a layer index (an integer >= 0), got {layer!r}")
        scale = entry.get("scale", 1.0)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise MixcliError(f"{here}: scale must be a finite number, got {scale!r}")
        steps.append(PathStep(model, layer, float(scale)))
    return steps


def build(context):
    from mixcli_layers._layermap import LayerEntry, LayerMap, model_named, plan_layer_map

    from . import dfs_model

    project, models = context.project, context.models
    steps = read_steps(context)
    embed_from = model_named(context.params["embed_from"] or next(iter(models)), models,
                        f"{project.where}: [method] embed_from")
    head_from = model_named(context.params["head_from"] or steps[-1].model, models, f"{project.where}: [method] head_from")
    unused = [m for m in models if m not in {embed_from, head_from} | {s.model for s in steps}]
    if unused:
        raise MixcliError(f"{project.where}: [models] model '{unused[0]}' is not on the path nor embed_from "
                          "or head_from; remove it")
    scales = [s.scale for s in steps]
    lmap = LayerMap(embed_from, head_from, [LayerEntry(s.model, s.layer) for s in steps],
                    details={"layer_input_scales": scales})
    plan = plan_layer_map(context, lmap, "layer_path", f"{project.where}: [method]")  # casts to [method] dtype
    if all(scale == 1.0 for scale in scales):
        return plan  # the stock architecture
    base = plan.config.get("model_type")
    if not dfs_model.supported(base):
        raise MixcliError(f"{project.where}: [method] layers: input scales other than 1 need a scaled decoder, "
                          f"which mixcli-evolve provides for {', '.join(dfs_model.BASES)}, not for '{base}'; "
                          "use scale = 1 throughout")
    config_class, model_class = dfs_model.VARIANTS[dfs_model.variant_type(base)]
    plan.config.update(model_type=config_class.model_type, architectures=[model_class.__name__],
                       layer_input_scales=scales, mixcli_plugin="mixcli-evolve")
    plan.notes.append(f"input scales: the output is a '{config_class.model_type}' model, which loads with "
                      "transformers' Auto classes where mixcli-evolve is installed")
    return plan


METHOD = Upscaler(
    name="layer_path",
    summary="A layer path through one or several models, each layer's input optionally scaled (DFS)",
    build=build,
    params=Params,
    min_inputs=1,
    example={"layers": [{"model": "first", "layer": 0}, {"model": "second", "layer": 1, "scale": 0.9}]},
)
