"""`mixcli import-mergekit CONFIG.yml`: a mergekit recipe as an equivalent mixcli project.

mixcli's tensor-wise methods carry mergekit's names, parameters and value forms (scalars,
gradients, filtered lists), so the translation is mostly a change of shape: ``models`` and
the models named in ``slices`` become ``[models]`` (named after their folders), ``parameters``
go to ``[method]``, each model's table or the slice, ``base_model`` becomes ``[method] base``,
``dtype`` / ``out_dtype`` become ``[method] dtype`` / ``[output] dtype``. Methods are looked up
in the registry, so a method a plugin adds translates once it is installed. Anything without a
mixcli equivalent is a one-line error naming the key.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from .errors import MixcliError, closest

TOP_KEYS = ("merge_method", "base_model", "dtype", "out_dtype", "parameters", "models", "slices",
            "tokenizer_source", "tokenizer")
DTYPE_NAMES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
               "half": "float16", "float32": "float32", "fp32": "float32", "float": "float32",
               "float64": "float64"}
_NAME = re.compile(r"[^A-Za-z0-9_-]+")


def read_yaml(path: Path) -> Any:
    import yaml

    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise MixcliError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise MixcliError(f"{path}: cannot read ({error})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        at = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise MixcliError(f"{path}{at}: invalid YAML: {problem}") from None


class _Models:
    """The mergekit model references met so far, each under a mixcli model name."""

    def __init__(self, where: str, root: Path):
        self.where, self.root = where, root
        self.entries: dict[str, dict] = {}  # name -> [models] entry
        self.by_reference: dict[str, str] = {}

    def name(self, reference: Any, key: str) -> str:
        if isinstance(reference, dict):  # {model: {path, revision}, lora: ..., override_architecture: ...}
            if reference.get("override_architecture") is not None:
                raise MixcliError(f"{self.where}: {key}.override_architecture: no mixcli equivalent; remove it")
            inner = reference.get("model")
            if not isinstance(inner, dict) or not isinstance(inner.get("path"), str):
                raise MixcliError(f"{self.where}: {key} must be a path, a Hub id or {{model: {{path, revision}}}}")
            revision = inner.get("revision")
            adapter = reference.get("lora")
            if adapter is not None and (not isinstance(adapter, dict) or not isinstance(adapter.get("path"), str)
                                        or adapter.get("revision")):
                raise MixcliError(f"{self.where}: {key}.lora must be {{path: ...}} (an adapter revision cannot be "
                                  "translated: download the adapter and give its folder)")
            reference = (inner["path"] + (f"@{revision}" if revision else "")
                         + (f"+{adapter['path']}" if adapter is not None else ""))
        if not isinstance(reference, str) or not reference:
            raise MixcliError(f"{self.where}: {key} must be a model path or Hub id, got {reference!r}")
        if reference in self.by_reference:
            return self.by_reference[reference]
        model, lora = reference, None
        if "+" in reference:  # model+lora: a model with a PEFT adapter (mixcli's `lora`)
            parts = reference.split("+")
            if len(parts) != 2 or not all(parts):
                raise MixcliError(f"{self.where}: {key}: '{reference}' must be 'model+lora' with one '+'")
            model, lora = parts
            if self._local(lora) is None and "@" in lora:
                raise MixcliError(f"{self.where}: {key}: the adapter revision in '{lora}' cannot be translated; "
                                  "download the adapter and give its folder")
        path, revision = model, None
        local = self._local(model)
        if local is None and "@" in model:
            path, revision = model.rsplit("@", 1)
            local = self._local(path)
        entry = {"path": str(local) if local is not None else path}
        if revision:
            entry["revision"] = revision
        if lora:
            entry["lora"] = str(self._local(lora) or lora)
        stem = _NAME.sub("_", Path(path.rstrip("/")).name).strip("_") or "model"
        if lora:
            stem = f"{stem}_{_NAME.sub('_', Path(lora.rstrip('/')).name).strip('_')}".strip("_")
        name, count = stem, 1
        while name in self.entries:
            count += 1
            name = f"{stem}_{count}"
        self.entries[name] = entry
        self.by_reference[reference] = name
        return name

    def _local(self, path: str) -> Path | None:
        """A reference that names a local folder (mergekit reads those from the working directory)."""
        candidate = Path(path).expanduser()
        candidate = candidate if candidate.is_absolute() else self.root / candidate
        return Path(os.path.normpath(candidate.absolute())) if candidate.is_dir() else None


def _table(value: Any, where: str, key: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise MixcliError(f"{where}: {key} must be a mapping, got {type(value).__name__}")
    return value


def _list(value: Any, where: str, key: str) -> list:
    if not isinstance(value, list) or not value:
        raise MixcliError(f"{where}: {key} must be a non-empty list")
    return value


def _unknown(table: dict, allowed: tuple, where: str, key: str) -> None:
    for name in table:
        if name not in allowed:
            prefix = f"{key}." if key else ""
            raise MixcliError(f"{where}: {prefix}{name}: no mixcli equivalent{closest(str(name), allowed)}; "
                              "remove it or translate it by hand")


def _parameters(value: Any, specs: dict, method: str, where: str, key: str, per_model_only: bool) -> dict:
    params = _table(value, where, key)
    for name, setting in params.items():
        spec = specs.get(name)
        if spec is None:
            raise MixcliError(f"{where}: {key}.{name}: method '{method}' has no parameter '{name}'"
                              f"{closest(str(name), specs)}")
        if per_model_only and not spec.per_model:
            raise MixcliError(f"{where}: {key}.{name}: '{name}' is shared by all models (mergekit ignores it "
                              "here); move it to the top-level or the slice's parameters")
        _check_value(setting, where, f"{key}.{name}")
        params[name] = _numbers(setting, spec.type)
    return dict(params)


def _numbers(setting: Any, kind: type) -> Any:
    """YAML 1.1 reads ``1e-3`` as a string, which mergekit's pydantic takes as a number: so do
    we, for numeric parameters, in scalars, gradients and filtered values alike."""
    if kind not in (float, int):
        return setting
    if isinstance(setting, list):
        return [_numbers(value, kind) for value in setting]
    if isinstance(setting, dict):
        return {k: (_numbers(v, kind) if k == "value" else v) for k, v in setting.items()}
    if isinstance(setting, str):
        try:
            number = float(setting)
        except ValueError:
            return setting
        return int(number) if kind is int and number.is_integer() else number
    return setting


def _check_value(setting: Any, where: str, key: str) -> None:
    """Values TOML can hold: mergekit's scalars, gradients and filtered lists (no nulls)."""
    if setting is None:
        raise MixcliError(f"{where}: {key} is empty (null); give a value or remove the key")
    if isinstance(setting, dict):
        for inner, value in setting.items():
            _check_value(value, where, f"{key}.{inner}")
    elif isinstance(setting, list):
        for i, value in enumerate(setting):
            _check_value(value, where, f"{key}[{i}]")
    elif not isinstance(setting, (str, int, float)):  # YAML dates and times
        raise MixcliError(f"{where}: {key}: {setting!r} is not a number, string or boolean")


def _dtype(value: Any, where: str, key: str) -> str:
    name = DTYPE_NAMES.get(str(value).lower())
    if name is None:
        raise MixcliError(f"{where}: {key}: unknown dtype {value!r}; mixcli writes "
                          f"{', '.join(sorted(set(DTYPE_NAMES.values())))}")
    return name


def _tokenizer(config: dict, base: str | None, models: _Models, where: str, sections: tuple) -> dict | None:
    """``tokenizer_source`` / ``tokenizer.source`` as a [tokenizer] table, or None for the default
    (the base model's tokenizer, which mixcli copies without one)."""
    if "tokenizer_source" in config and "tokenizer" in config:
        raise MixcliError(f"{where}: tokenizer_source and tokenizer exclude each other; keep one")
    key = "tokenizer_source" if "tokenizer_source" in config else "tokenizer"
    if key not in config:
        return None
    value = config[key]
    if key == "tokenizer":
        value = _table(value, where, key)
        _unknown(value, ("source", "pad_to_multiple_of"), where, key)
        extra = {k: v for k, v in value.items() if k != "source"}
        value = value.get("source", "union")
        key = "tokenizer.source"
    else:
        extra = {}
    if value == "base" or (base is not None and isinstance(value, str) and models.by_reference.get(value) == base):
        if not extra and "tokenizer" not in sections:
            return None  # what mixcli does without a [tokenizer] table
        source = "base"
    elif value == "union":
        source = "union"
    elif isinstance(value, str):
        source = f"model:{models.name(value, key)}"
    else:
        raise MixcliError(f"{where}: {key}: {value!r} cannot be translated; give base, union or a model")
    if "tokenizer" not in sections:
        raise MixcliError(f"{where}: {key}: {value!r} cannot be translated: this mixcli copies the base "
                          "model's tokenizer and has no [tokenizer] table")
    return {"source": source, **extra}


def translate(path: Path, registry, output: str | None = None) -> dict:
    """The mixcli project (as TOML data) equivalent to the mergekit recipe at ``path``.

    Local model folders are found from the working directory, as mergekit finds them, and
    written as absolute paths; other references (Hub ids) are kept as they are.
    """
    from .project import TOP_LEVEL

    where = Path(path).name
    config = _table(read_yaml(path), where, "the recipe")
    _unknown(config, TOP_KEYS, where, "")
    if "merge_method" not in config:
        raise MixcliError(f"{where}: merge_method is missing")
    method_name = config["merge_method"]
    method = registry.methods.get(method_name) if isinstance(method_name, str) else None
    if method is None or method.kind != "merge":
        merges = [name for name, m in registry.methods.items() if m.kind == "merge"]
        raise MixcliError(f"{where}: merge_method: '{method_name}' has no mixcli equivalent installed"
                          f"{closest(str(method_name), merges)}; `mixcli list-methods` shows the methods")
    specs = method.param_specs
    models = _Models(where, Path.cwd())
    if ("models" in config) == ("slices" in config):
        raise MixcliError(f"{where}: give exactly one of models and slices")

    base = models.name(config["base_model"], "base_model") if config.get("base_model") is not None else None
    data: dict = {}
    method_table: dict = {"name": method_name}
    if base is not None:
        method_table["base"] = base
    if "dtype" in config:
        method_table["dtype"] = _dtype(config["dtype"], where, "dtype")
    method_table.update(_parameters(config.get("parameters"), specs, method_name, where, "parameters", False))

    if "models" in config:
        own: dict[str, dict] = {}
        for i, entry in enumerate(_list(config["models"], where, "models")):
            key = f"models[{i}]"
            entry = _table(entry, where, key)
            _unknown(entry, ("model", "parameters"), where, key)
            if "model" not in entry:
                raise MixcliError(f"{where}: {key}.model is missing")
            name = models.name(entry["model"], f"{key}.model")
            if name in own:  # mergekit would not merge one model twice either; never guess which weight
                raise MixcliError(f"{where}: {key}.model: {entry['model']!r} is listed twice; list each model once")
            own.setdefault(name, {}).update(_parameters(entry.get("parameters"), specs, method_name, where,
                                                        f"{key}.parameters", True))
        for name, params in own.items():
            models.entries[name].update(params)
    else:
        slices = []
        for i, piece in enumerate(_list(config["slices"], where, "slices")):
            key = f"slices[{i}]"
            piece = _table(piece, where, key)
            _unknown(piece, ("sources", "base_model", "parameters"), where, key)
            sources = []
            for j, source in enumerate(_list(piece.get("sources"), where, f"{key}.sources")):
                skey = f"{key}.sources[{j}]"
                source = _table(source, where, skey)
                _unknown(source, ("model", "layer_range", "parameters"), where, skey)
                if "model" not in source:
                    raise MixcliError(f"{where}: {skey}.model is missing")
                out = {"model": models.name(source["model"], f"{skey}.model")}
                if "layer_range" in source:
                    out["layer_range"] = source["layer_range"]
                out.update(_parameters(source.get("parameters"), specs, method_name, where,
                                       f"{skey}.parameters", True))
                sources.append(out)
            entry: dict = {"sources": sources}
            if piece.get("base_model") is not None:
                entry["base"] = models.name(piece["base_model"], f"{key}.base_model")
            entry.update(_parameters(piece.get("parameters"), specs, method_name, where, f"{key}.parameters", False))
            slices.append(entry)
        data["slices"] = slices

    tokenizer = _tokenizer(config, base, models, where, TOP_LEVEL)
    out_table: dict = {"path": output or f"out/{Path(path).stem}"}
    if "out_dtype" in config:
        out_table["dtype"] = _dtype(config["out_dtype"], where, "out_dtype")
    project = {"models": models.entries, "method": method_table}
    if "slices" in data:
        project["slices"] = data["slices"]
    if tokenizer is not None:
        project["tokenizer"] = tokenizer
    project["output"] = out_table
    return project
