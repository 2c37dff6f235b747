"""model_recombination: n models of one architecture reshuffled into n new ones (FedMR,
arXiv 2305.10730).

    [method]
    name = "model_recombination"
    granularity = "layer"      # or "sublayer" (alias "module"), "tensor"
    seed = 7
    num_outputs = 3            # default: as many as the inputs; 1 writes a single model

Every slot (unit of granularity) of output ``j`` is taken from input ``perm_slot[j]``, where
``perm_slot`` is a permutation of the inputs drawn per slot by a Fisher-Yates shuffle from a
generator of its own (``random.Random(seed)``), slots visited in a fixed order. Each output
tensor is a copy of one input tensor read from the files; nothing goes through live modules,
so every input tensor is used exactly once per slot across the outputs.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

from mixcli import MixcliError, Upscaler, param
from mixcli.architecture import check_layer_count, layout_of
from mixcli.plan import OutputPlan, OutputTensor

from ._layermap import _Copy, cast_floating

FORMAT = "mixcli-recombination/1"


@dataclass
class Params:
    granularity: str = param("layer", help="unit recombined as a whole: layer (one block; embeddings "
                                           "and head one slot each), sublayer/module (one child of a "
                                           "block: attention, MLP, each norm) or tensor",
                             choices=("layer", "sublayer", "module", "tensor"))
    num_outputs: int | None = param(None, help="how many recombined models to write (default: one per "
                                               "input; 1 writes a single model)", min=1)


def check_structure(models: dict, where: str) -> None:
    """Identical tensor names, shapes and dtypes (headers only)."""
    names = list(models)
    ref = models[names[0]]
    for name in names:
        check_layer_count(models[name], where)
    for name in names[1:]:
        ckpt = models[name]
        if ckpt.config.get("model_type") != ref.config.get("model_type"):
            raise MixcliError(f"{where}: model '{name}' is a '{ckpt.config.get('model_type')}' but "
                              f"'{names[0]}' is a '{ref.config.get('model_type')}'; recombination needs "
                              "models of one architecture")
        missing = sorted(set(ref.tensors) ^ set(ckpt.tensors))
        if missing:
            owner = names[0] if missing[0] in ref.tensors else name
            raise MixcliError(f"{where}: tensor '{missing[0]}' is only in model '{owner}'; recombination "
                              "needs models with identical tensors")
        for tensor, info in ref.tensors.items():
            theirs = ckpt.tensors[tensor]
            if (theirs.shape, theirs.dtype) != (info.shape, info.dtype):
                raise MixcliError(f"{where}: tensor '{tensor}' is {info.dtype} {list(info.shape)} in model "
                                  f"'{names[0]}' but {theirs.dtype} {list(theirs.shape)} in model '{name}'; "
                                  "recombination needs models with identical shapes and dtypes")


def slots(ckpt, granularity: str) -> list[tuple[str, list[str]]]:
    """(slot name, tensor names) in canonical order: pre-layer, layers by index (children in
    sorted order), post-layer; for ``tensor``, names sorted. Tied tensors share a slot."""
    names = sorted(ckpt.tensors)
    layout = layout_of(ckpt.config)
    tied_head = None  # a head stored beside the embedding it is tied to
    if ckpt.config.get("tie_word_embeddings") and layout.head in ckpt.tensors:
        tied_head = next((a for a in layout.embeddings if a in ckpt.tensors), None)
    keyed: dict[str, list[str]] = {}
    order: dict[str, tuple] = {}
    for name in names:
        owner = tied_head if name == layout.head and tied_head else name
        split = layout.split(owner)
        if granularity == "tensor":
            key, rank = owner, (0, owner)
        elif split is None:
            key, rank = ("pre", (0,)) if layout.role(owner) == "pre" else ("post", (2,))
        elif granularity == "layer":
            key, rank = f"layer.{split[1]}", (1, split[1])
        else:
            rest = split[0].split("{}.", 1)[1]
            child = rest.split(".", 1)[0]
            key, rank = f"layer.{split[1]}.{child}", (1, split[1], child)
        keyed.setdefault(key, []).append(name)
        order[key] = rank
    return [(key, keyed[key]) for key in sorted(keyed, key=lambda k: order[k])]


def permutation_table(slot_names: list[str], n: int, seed: int) -> dict[str, list[int]]:
    """One Fisher-Yates permutation of range(n) per slot, in slot order, from Random(seed)."""
    rng = random.Random(seed)
    table = {}
    for slot in slot_names:
        perm = list(range(n))
        for i in range(n - 1, 0, -1):
            j = rng.randrange(i + 1)
            perm[i], perm[j] = perm[j], perm[i]
        table[slot] = perm
    return table


def build(context):
    project, models = context.project, context.models
    where = f"{project.where}: [models]"
    names = list(models)
    n = len(names)
    check_structure(models, where)
    count = context.params.get("num_outputs") or n
    if count > n:
        raise MixcliError(f"{project.where}: [method] num_outputs is {count} but there are only {n} input "
                          f"models; each output takes every slot from a different input, so use 1..{n}")
    granularity = context.params["granularity"]
    granularity = "sublayer" if granularity == "module" else granularity
    ref = models[names[0]]
    groups = slots(ref, granularity)
    table = permutation_table([key for key, _ in groups], n, context.seed)
    plans = {}
    for j in range(count):
        tensors = []
        for key, members in groups:
            ckpt = models[names[table[key][j]]]
            for name in members:
                info = ckpt.tensors[name]
                tensors.append(OutputTensor(name, info.shape, info.dtype, _Copy(ckpt, name, None),
                                            [(ckpt, name)], {"source": ckpt.name, "slot": key}))
        meta = {
            "format": FORMAT,
            "method": "model_recombination",
            "seed": context.seed,
            "granularity": granularity,
            "models": names,
            "paths": {name: project.models[name].path for name in names},
            "output": j,
            "num_outputs": count,
            "slots": [{"slot": key, "tensors": members, "sources": table[key],
                       "source": names[table[key][j]]} for key, members in groups],
        }
        extra = {"recombination.json": (json.dumps(meta, indent=2) + "\n").encode()}
        config = dict(ref.config)
        if project.dtype:
            cast_floating(tensors, config, project.dtype)
        plans[f"model_{j}"] = OutputPlan(config=config, tensors=tensors, donor=ref, extra_files=extra)
    return plans["model_0"] if count == 1 else plans


METHOD = Upscaler(
    name="model_recombination",
    summary="Recombine n same-architecture models into n (or fewer) by seeded per-slot permutations",
    build=build,
    params=Params,
    min_inputs=1,
)
