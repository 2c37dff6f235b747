"""frankenmerge: layer ranges from one or several models stacked into a new model.

    [method]
    name = "frankenmerge"
    layers = [{ model = "a", range = [0, 24] },
              { model = "b", range = [8, 32], scale = [{ filter = "o_proj", value = 0.5 }, { value = 1.0 }] }]

Embeddings come from the first entry's model, final norm and ``lm_head`` from the last
entry's (``embed_from`` / ``head_from`` override). ``range`` is half-open; an empty range
``[a, a]`` is allowed as the first or last entry only and just names that donor (mergekit's
zero-length final slice). ``layers`` (the layer-spec grammar) may replace ``range``.
"""

from __future__ import annotations

from dataclasses import dataclass

from mixcli import MixcliError, Upscaler, param

from ._layermap import LayerEntry, LayerMap, check_scale, layer_entries, model_named, plan_layer_map
from .layer_spec import parse_layer_spec

ENTRY_KEYS = ("model", "range", "layers", "scale")


@dataclass
class Params:
    layers: list = param(help="the slices in order, each {model = \"a\", range = [start, stop]} "
                              "(half-open) or {model = \"a\", layers = [\"0:8\", 3]}, optional scale")
    embed_from: str | None = param(None, help="model whose embeddings are copied (default: the first entry's)")
    head_from: str | None = param(None, help="model whose final norm and lm_head are copied "
                                             "(default: the last entry's)")
    scale: float | None = param(None, help="scale of every entry without its own: a number, a "
                                           "gradient over the entry's layers or a filtered list")


def _indices(entry: dict, count: int, where: str) -> tuple[list[int], bool]:
    """The entry's source layers, and whether it is an (allowed at the ends) empty range."""
    if ("range" in entry) == ("layers" in entry):
        raise MixcliError(f"{where}: give exactly one of range = [start, stop] or layers = [...]")
    if "layers" in entry:
        return parse_layer_spec(entry["layers"], count, f"{where} layers"), False
    value = entry["range"]
    if (not isinstance(value, list) or len(value) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in value)):
        raise MixcliError(f"{where}: range must be [start, stop] with integers (stop excluded), got {value!r}")
    start, stop = value
    if start < 0 or stop < start:
        raise MixcliError(f"{where}: range {value} is reversed or negative; write [start, stop] with "
                          "0 <= start <= stop (stop excluded)")
    if stop > count:
        raise MixcliError(f"{where}: range {value} is out of range: the model has {count} layers "
                          f"(0..{count - 1}), so stop can be at most {count}")
    return list(range(start, stop)), start == stop


def build_map(context, method: str = "frankenmerge") -> LayerMap:
    project, models = context.project, context.models
    where = f"{project.where}: [method] layers"
    entries = context.params["layers"]
    default_scale = project.params.get("scale")  # the whole setting (filtered lists included)
    slices = []
    for n, here, entry in layer_entries(context, ENTRY_KEYS, '{model = "a", range = [0, 24]}',
                                        'list the slices, e.g. [{model = "a", range = [0, 24]}, '
                                        '{model = "b", range = [8, 32]}]'):
        if "model" not in entry:
            raise MixcliError(f"{here}: 'model' is missing; name one of [models]: {', '.join(models)}")
        model = model_named(entry["model"], models, f"{here} model")
        count = models[model].num_layers
        if count is None:
            raise MixcliError(f"{here}: model '{model}' has no layer count in its config.json")
        indices, empty = _indices(entry, count, here)
        if empty and 1 < n < len(entries):
            raise MixcliError(f"{here}: an empty range contributes nothing; it is allowed only as the "
                              "first or last entry, where it picks the embedding or head model")
        scale = check_scale(entry["scale"], f"{here} scale") if "scale" in entry else default_scale
        slices.append((model, indices, scale))
    layers = []
    for model, indices, scale in slices:
        for j, index in enumerate(indices):
            position = j / (len(indices) - 1) if len(indices) > 1 else 1.0  # gradients restart per slice
            layers.append(LayerEntry(model, index, scale, position))
    if not layers:
        raise MixcliError(f"{where}: the entries select no layers; give at least one non-empty range")
    embed_from = context.params.get("embed_from") or slices[0][0]
    head_from = context.params.get("head_from") or slices[-1][0]
    model_named(embed_from, models, f"{project.where}: [method] embed_from")
    model_named(head_from, models, f"{project.where}: [method] head_from")
    unused = [m for m in models if m not in {embed_from, head_from} | {e.model for e in layers}]
    if unused:
        raise MixcliError(f"{project.where}: [models] model '{unused[0]}' is not used by [method] layers, "
                          "embed_from or head_from; remove it or add an entry for it")
    # mergekit semantics: pre-layer tensors take the first slice's scale, post-layer the last's
    embed_scale = slices[0][2] if slices[0][0] == embed_from else None
    head_scale = slices[-1][2] if slices[-1][0] == head_from else None
    return LayerMap(embed_from, head_from, layers, embed_scale, head_scale)


def build(context):
    lmap = build_map(context)
    return plan_layer_map(context, lmap, "frankenmerge", f"{context.project.where}: [method]")


METHOD = Upscaler(
    name="frankenmerge",
    summary="Stack layer ranges of one or several models (passthrough slices)",
    build=build,
    params=Params,
    min_inputs=1,
    example={"layers": [{"model": "first", "layers": [":"]}, {"model": "second", "layers": [":"]}]},
)
