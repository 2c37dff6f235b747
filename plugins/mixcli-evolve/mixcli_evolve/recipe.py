"""Candidates as ordinary recipes: the skeleton a genome fills in, a recipe's hash, and the
recipe written as a plain mixcli project (no [search]) that `mixcli merge` reproduces."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import tomli

from .settings import SearchSettings

GENE_KEYS = ("weight", "density", "t")
BEST_RECIPE = "best.toml"
BEST_MODEL = "model"  # the best model's folder, beside best.toml


def skeleton(project, method, settings: SearchSettings) -> dict:
    """The project as a recipe for the genome to fill: its searched models (and base) with
    absolute paths and no gene parameters, its [method] with mergekit-evolve's settings
    (dtype, normalize, int8_mask where the method takes them), no [search], no [[evaluation]]."""
    from mixcli.core import recipe

    data = tomli.loads(recipe(project))
    keep = list(settings.models) + ([settings.base] if settings.base and settings.base not in settings.models else [])
    models = {}
    for name in keep:
        entry = data["models"][name]
        entry = dict(entry) if isinstance(entry, dict) else {"path": entry}
        for key in GENE_KEYS:
            entry.pop(key, None)
        models[name] = entry
    table = {k: v for k, v in data["method"].items() if k not in GENE_KEYS + ("normalize", "int8_mask")}
    table["dtype"] = settings.dtype
    if settings.space == "layers":  # the paths' recipes name only the models (paths below)
        return {"models": models, "method": table}
    specs = method.param_specs
    if "normalize" in specs:
        table["normalize"] = settings.normalize
    if "int8_mask" in specs:
        table["int8_mask"] = True
    out = {"models": models, "method": table}
    if "tokenizer" in data:
        out["tokenizer"] = data["tokenizer"]
    out["output"] = {key: value for key, value in data.get("output", {}).items() if key != "path"}
    out["output"]["path"] = BEST_MODEL
    return out


def recipe_hash(recipe: dict) -> str:
    """Identical recipes, identical hashes (the output path aside): the search's cache key."""
    content = {k: v for k, v in recipe.items() if k != "output"}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def recipe_text(recipe: dict, note: str = "") -> str:
    from mixcli.tomlwrite import dumps

    header = f"# {note}\n" if note else ""
    return header + dumps(recipe)


def write_atomically(path: Path, text: str) -> None:
    """``path`` holds either its old content or ``text``, never a part of it."""
    path = Path(path)
    scratch = path.with_name(f".{path.name}.tmp")
    with open(scratch, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(scratch, path)
