"""The TOML project file: parsed, then checked against the registered methods before any
weight is read. Every error names the file and the key at fault."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli

from .errors import MixcliError, closest
from .params import check_setting, filters, matches
from .safetensors_io import parse_size

DTYPES = ("float32", "float16", "bfloat16", "float64")
TOP_LEVEL = ("models", "method", "slices", "output", "evaluation", "tokenizer")
MODEL_KEYS = ("path", "revision", "loader", "lora")
METHOD_KEYS = ("name", "base", "seed", "dtype", "compute_dtype", "overrides")
SLICE_KEYS = ("sources", "base")
SOURCE_KEYS = ("model", "layer_range")
OVERRIDE_KEYS = ("match", "models")
OUTPUT_KEYS = ("path", "dtype", "shard_size", "copy_tokenizer", "device")
DEFAULT_SHARD_SIZE = 2 * 10**9


@dataclass
class ModelRef:
    name: str
    path: str
    project_dir: Path
    where: str
    revision: str | None = None
    loader: str | None = None
    params: dict = field(default_factory=dict)
    lora: str | None = None  # a PEFT adapter folder or Hub id applied to the model

    @property
    def resolved_path(self) -> Path:
        path = Path(self.path).expanduser()
        return path if path.is_absolute() else self.project_dir / path


@dataclass
class SliceSource:
    model: str
    layer_range: tuple[int, int] | None
    params: dict
    where: str


@dataclass
class Slice:
    sources: list[SliceSource]
    base: str | None
    params: dict
    where: str


@dataclass
class Override:
    match: str
    models: list[str] | None
    params: dict
    where: str


@dataclass
class EvaluationSpec:
    evaluator: str
    params: dict
    where: str


@dataclass
class Project:
    file: Path
    models: dict[str, ModelRef]
    method: str
    base: str | None
    seed: int
    dtype: str | None
    compute_dtype: str | None
    params: dict
    overrides: list[Override]
    slices: list[Slice] | None
    output_path: Path | None
    out_dtype: str | None
    shard_size: int
    copy_tokenizer: bool
    evaluations: list[EvaluationSpec]
    text: str
    sections: dict = field(default_factory=dict)  # method-specific top-level tables, e.g. [tune]
    tokenizer: Any = None  # mixcli.vocabulary.TokenizerSettings, from [tokenizer]
    device: str = "cpu"  # where tensor-wise methods compute ([output] device, --device)

    @property
    def where(self) -> str:
        return self.file.name


def _table(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise MixcliError(f"{where} must be a table")
    return value


def _tables(value: Any, where: str, header: str) -> list:
    """An array of tables (``[[header]]``), or a one-line error naming the key."""
    if not isinstance(value, list) or not all(isinstance(entry, dict) for entry in value):
        shown = "a table" if isinstance(value, dict) else repr(value)
        raise MixcliError(f"{where} must be a list of [[{header}]] tables, got {shown}; write each entry "
                          f"under its own [[{header}]] header")
    return value


def _optional_str(value: Any, where: str) -> str | None:
    return None if value is None else _str(value, where)


def _split(table: dict, reserved: tuple, where: str) -> dict:
    """The keys of ``table`` that are not reserved: method parameters, checked later."""
    return {k: v for k, v in table.items() if k not in reserved}


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise MixcliError(f"{where} must be a non-empty string")
    return value


def check_device(value: Any, where: str) -> str:
    """A torch device name mixcli computes on: "cpu", "cuda" or "cuda:N"."""
    name = value if isinstance(value, str) else ""
    kind, colon, index = name.partition(":")
    if kind not in ("cpu", "cuda") or (colon and (kind == "cpu" or not index.isdigit())):
        raise MixcliError(f"{where} must be \"cpu\", \"cuda\" or \"cuda:N\", got {value!r}")
    return name


def _dtype(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if value not in DTYPES:
        raise MixcliError(f"{where} must be one of {', '.join(DTYPES)}, got {value!r}"
                          + closest(str(value), DTYPES))
    return value


def _unknown(table: dict, allowed: tuple, where: str) -> None:
    for key in table:
        if key not in allowed:
            raise MixcliError(f"{where}: unknown key '{key}'{closest(key, allowed)}")


def model_and_lora(entry: dict, project_dir: Path, where: str) -> tuple[str, str | None]:
    """The model path and its LoRA adapter: ``lora = "..."``, or mergekit's "model+adapter"
    (split only when no folder of that literal name exists)."""
    path = _str(entry["path"], f"{where} path")
    lora = _str(entry["lora"], f"{where} lora") if "lora" in entry else None
    if "+" in path and lora is None and not (project_dir / Path(path).expanduser()).exists():
        parts = path.split("+")
        if len(parts) != 2 or not all(parts):
            raise MixcliError(f"{where} path: '{path}' must be 'model+adapter' with one '+', "
                              "or write path = \"...\" and lora = \"...\" separately")
        path, lora = parts
    return path, lora


def read_project(path: str | Path, text: str | None = None) -> Project:
    """Parse a project file; structural errors only (methods are checked by :func:`check`).

    With ``text``, that is the project and ``path`` only where it would live: relative
    paths resolve against its folder (multi-stage projects check their stages this way)."""
    file = Path(path)
    try:
        text = file.read_text() if text is None else text
    except FileNotFoundError:
        raise MixcliError(f"{file}: no such project file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise MixcliError(f"{file}: cannot read ({error})") from None
    try:
        data = tomli.loads(text)
    except tomli.TOMLDecodeError as error:
        message = getattr(error, "msg", str(error))
        raise MixcliError(f"{file}:{getattr(error, 'lineno', '?')}:{getattr(error, 'colno', '?')}: "
                          f"invalid TOML: {message}") from None
    name = file.name
    if isinstance(data.get("stage"), list):  # only merge and validate run the stages
        raise MixcliError(f"{name} is a multi-stage project ([[stage]] tables), which `mixcli merge` and "
                          f"`mixcli validate` run; give this command a stage's output folder or its project "
                          f"{file.stem}.STAGE.toml")
    # other top-level tables belong to the method (e.g. [tune]); check() knows which it reads,
    # but a near miss of a core section is a typo
    for key in data:
        if key not in TOP_LEVEL and closest(key, TOP_LEVEL):
            raise MixcliError(f"{name}: unknown key '{key}'{closest(key, TOP_LEVEL)}")
    sections = {key: _table(value, f"{name}: [{key}]") for key, value in data.items() if key not in TOP_LEVEL}
    project_dir = file.resolve().parent

    models: dict[str, ModelRef] = {}
    for key, entry in _table(data.get("models", {}), f"{name}: [models]").items():
        where = f"{name}: [models.{key}]"
        if isinstance(entry, str):
            entry = {"path": entry}
        if not isinstance(entry, dict):
            raise MixcliError(f"{where} must be a path (\"models/x\") or a table ({{ path = \"models/x\", ... }}), "
                              f"got {entry!r}")
        if "path" not in entry:
            raise MixcliError(f"{where}: 'path' is missing; give a local folder or a Hub id")
        path, lora = model_and_lora(entry, project_dir, where)
        models[key] = ModelRef(
            name=key, path=path, project_dir=project_dir, where=where,
            revision=_optional_str(entry.get("revision"), f"{where} revision"),
            loader=_optional_str(entry.get("loader"), f"{where} loader"),
            params=_split(entry, MODEL_KEYS, where), lora=lora)
    if not models:
        raise MixcliError(f"{name}: [models] is empty; list the models to merge, e.g. base = \"models/base\"")

    def model_name(value: Any, where: str) -> str:
        value = _str(value, where)
        if value not in models:
            raise MixcliError(f"{where}: no model named '{value}' in [models]{closest(value, models)}")
        return value

    if "method" not in data:
        raise MixcliError(f"{name}: [method] is missing; add [method] with name = \"...\" "
                          "(see `mixcli list-methods`)")
    method = _table(data["method"], f"{name}: [method]")
    if "name" not in method:
        raise MixcliError(f"{name}: [method] name is missing (see `mixcli list-methods`)")
    seed = method.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise MixcliError(f"{name}: [method] seed must be a non-negative integer, got {seed!r}")

    overrides = []
    for i, entry in enumerate(_tables(method.get("overrides", []), f"{name}: [method] overrides",
                                      "method.overrides")):
        where = f"{name}: [[method.overrides]] #{i + 1}"
        entry = _table(entry, where)
        if "match" not in entry:
            raise MixcliError(f"{where}: 'match' is missing; give a substring of the tensor names it applies to")
        restrict = entry.get("models")
        if restrict is not None:
            if not isinstance(restrict, list):
                raise MixcliError(f"{where}: models must be a list of model names")
            restrict = [model_name(m, f"{where} models") for m in restrict]
        overrides.append(Override(_str(entry["match"], f"{where} match"), restrict,
                                  _split(entry, OVERRIDE_KEYS, where), where))

    slices = None
    if "slices" in data:
        slices = []
        if not isinstance(data["slices"], list) or not data["slices"]:
            raise MixcliError(f"{name}: slices must be a non-empty list of [[slices]] tables")
        for i, entry in enumerate(data["slices"]):
            where = f"{name}: [[slices]] #{i + 1}"
            entry = _table(entry, where)
            sources = entry.get("sources")
            if not isinstance(sources, list) or not sources:
                raise MixcliError(f"{where}: 'sources' must be a non-empty list of "
                                  "{model = \"...\", layer_range = [start, end]}")
            parsed = []
            for j, source in enumerate(sources):
                swhere = f"{where} source {j + 1}"
                source = _table(source, swhere)
                if "model" not in source:
                    raise MixcliError(f"{swhere}: 'model' is missing")
                layer_range = source.get("layer_range")
                if layer_range is not None:
                    if (not isinstance(layer_range, list) or len(layer_range) != 2
                            or not all(isinstance(x, int) and not isinstance(x, bool) for x in layer_range)
                            or not 0 <= layer_range[0] <= layer_range[1]):
                        raise MixcliError(f"{swhere}: layer_range must be [start, end] with "
                                          f"0 <= start < end (end excluded), got {layer_range!r}")
                    if layer_range[0] == layer_range[1] and (i < len(data["slices"]) - 1 or i == 0):
                        raise MixcliError(f"{swhere}: a zero-length layer_range {layer_range!r} is allowed "
                                          "only in the last of several [[slices]] (it picks the model of "
                                          "the final norm and lm_head); give start < end")
                    layer_range = tuple(layer_range)
                parsed.append(SliceSource(model_name(source["model"], f"{swhere} model"), layer_range,
                                          _split(source, SOURCE_KEYS, swhere), swhere))
            base = model_name(entry["base"], f"{where} base") if "base" in entry else None
            slices.append(Slice(parsed, base, _split(entry, SLICE_KEYS, where), where))

    output = _table(data.get("output", {}), f"{name}: [output]")
    _unknown(output, OUTPUT_KEYS, f"{name}: [output]")
    out_path = output.get("path")
    copy_tokenizer = output.get("copy_tokenizer", True)
    if not isinstance(copy_tokenizer, bool):
        raise MixcliError(f"{name}: [output] copy_tokenizer must be true or false")

    evaluations = []
    for i, entry in enumerate(_tables(data.get("evaluation", []), f"{name}: evaluation", "evaluation")):
        where = f"{name}: [[evaluation]] #{i + 1}"
        entry = _table(entry, where)
        if "evaluator" not in entry:
            raise MixcliError(f"{where}: 'evaluator' is missing (see `mixcli list-methods`)")
        evaluations.append(EvaluationSpec(_str(entry["evaluator"], f"{where} evaluator"),
                                          _split(entry, ("evaluator",), where), where))

    tokenizer = None
    if "tokenizer" in data:
        from .vocabulary import parse_tokenizer

        tokenizer = parse_tokenizer(data["tokenizer"], f"{name}: [tokenizer]", models)

    return Project(
        file=file, models=models, method=_str(method["name"], f"{name}: [method] name"),
        base=model_name(method["base"], f"{name}: [method] base") if "base" in method else None,
        seed=seed, dtype=_dtype(method.get("dtype"), f"{name}: [method] dtype"),
        compute_dtype=_dtype(method.get("compute_dtype"), f"{name}: [method] compute_dtype"),
        params=_split(method, METHOD_KEYS, f"{name}: [method]"), overrides=overrides, slices=slices,
        output_path=(project_dir / _str(out_path, f"{name}: [output] path")) if out_path is not None else None,
        out_dtype=_dtype(output.get("dtype"), f"{name}: [output] dtype"),
        shard_size=parse_size(output.get("shard_size", DEFAULT_SHARD_SIZE), f"{name}: [output] shard_size"),
        copy_tokenizer=copy_tokenizer, evaluations=evaluations, text=text, sections=sections,
        tokenizer=tokenizer, device=check_device(output.get("device", "cpu"), f"{name}: [output] device"))


def project_from_dict(data: dict, base_dir: Path, name: str = "recipe.toml") -> Project:
    """A project given as a dict (the tables a TOML file would hold), e.g. a recipe a search
    made: written as TOML and read back by :func:`read_project`, so it gets the same checks
    and errors, naming the pseudo-file ``name``; relative paths resolve against ``base_dir``.
    Nothing is written to disk. ``project.text`` holds the TOML, which ``mixcli merge``
    reproduces the project from."""
    from .tomlwrite import dumps

    if not isinstance(data, dict):
        raise MixcliError(f"{name}: a project must be a table (a dict), got {type(data).__name__}")
    return read_project(Path(base_dir) / name, dumps(_plain(data, name)))


def _plain(value: Any, name: str, keys: tuple = ()) -> Any:
    """``value`` with tuples as lists, paths as strings and numpy scalars as numbers, or a one-line error naming the key
    of what TOML cannot hold."""
    if isinstance(value, dict):
        for key in value:
            if not isinstance(key, str):
                raise MixcliError(f"{name}: key {key!r} under '{'.'.join(keys) or 'the top level'}' "
                                  "must be a string")
        return {key: _plain(item, name, keys + (key,)) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item, name, keys) for item in value]
    if isinstance(value, Path):
        return str(value)
    if callable(getattr(value, "item", None)) and getattr(value, "shape", None) == ():
        value = value.item()  # a numpy or torch scalar, as a search's genotype gives
    if isinstance(value, float) and not isinstance(value, bool):
        return float(value)  # np.float64 is a float whose repr is not TOML
    if value is None or not isinstance(value, (bool, int, float, str)):
        raise MixcliError(f"{name}: '{'.'.join(keys)}' is {value!r} ({type(value).__name__}), which TOML "
                          "cannot hold; give a string, number, boolean, list or table")
    return value


def check(project: Project, registry) -> Any:
    """Check the method, its parameters and the evaluations; return the method component."""
    name = project.where
    method = registry.methods.get(project.method)
    if method is None:
        raise MixcliError(f"{name}: [method] unknown method '{project.method}'"
                          f"{closest(project.method, registry.methods)}; `mixcli list-methods` shows them all")
    method_tables = tuple(getattr(method, "sections", ()))
    own = method_tables + tuple(registry.sections)
    for key in project.sections:
        if key not in own:
            hint = closest(key, own) or f" (method '{method.name}' reads no [{key}] table)"
            raise MixcliError(f"{name}: unknown key '{key}'{hint}")
    specs = method.param_specs

    def check_params(params: dict, where: str, allow_shared: bool) -> None:
        for key, setting in params.items():
            spec = specs.get(key)
            if spec is None:
                known = list(specs) if allow_shared else [k for k, s in specs.items() if s.per_model]
                hint = closest(key, known)
                if key in MODEL_KEYS + METHOD_KEYS + SLICE_KEYS + SOURCE_KEYS:
                    hint = f" ('{key}' is not allowed here)"
                if key in getattr(method, "param_hints", {}):
                    hint = f" ({method.param_hints[key]})"
                raise MixcliError(f"{where}: unknown parameter '{key}' for method '{method.name}'{hint}")
            if not allow_shared and not spec.per_model:
                raise MixcliError(f"{where}: parameter '{key}' of '{method.name}' is shared by all models; "
                                  "set it under [method] (or a [[method.overrides]] entry), not per model")
            # a switch that lifts bounds (slerp's extrapolate) is read from [method] only
            lifted = spec.lifted_by is not None and project.params.get(spec.lifted_by) is True
            params[key] = check_setting(spec, setting, where, lifted)  # typed and normalised from here on

    check_params(project.params, f"{name}: [method]", True)
    for override in project.overrides:
        check_params(override.params, override.where, True)
        if override.models:
            for key in override.params:
                if not specs[key].per_model:
                    raise MixcliError(f"{override.where}: parameter '{key}' is shared by all models and "
                                      "cannot be restricted to some models; drop 'models' or the parameter")
    for ref in project.models.values():
        check_params(ref.params, ref.where, False)
    for piece in project.slices or []:
        check_params(piece.params, piece.where, True)
        for source in piece.sources:
            check_params(source.params, source.where, False)
    for evaluation in project.evaluations:
        evaluator = registry.evaluators.get(evaluation.evaluator)
        if evaluator is None:
            raise MixcliError(f"{evaluation.where}: unknown evaluator '{evaluation.evaluator}'"
                              f"{closest(evaluation.evaluator, registry.evaluators)}")
        especs = evaluator.param_specs
        for key, setting in evaluation.params.items():
            if key not in especs:
                raise MixcliError(f"{evaluation.where}: unknown parameter '{key}' for evaluator "
                                  f"'{evaluator.name}'{closest(key, especs)}")
            check_setting(especs[key], setting, evaluation.where)
        for key, spec in especs.items():
            if spec.required and key not in evaluation.params:
                raise MixcliError(f"{evaluation.where}: evaluator '{evaluator.name}' needs '{key}' ({spec.help})")
    for key in project.sections:  # tables a plugin's command reads ([search]): their own checks
        if key in registry.sections and key not in method_tables:
            registry.sections[key].check(project, method, registry)
    return method


def unmatched_filters(project: Project, names) -> list[str]:
    """A warning for every override ``match`` and parameter filter that applies to none of
    ``names`` (the plan's output and input tensor names): most likely a typo."""
    names = list(names)
    warnings = []

    def unmatched(filt: str) -> bool:
        return not any(matches(filt, name) for name in names)

    levels = [(f"{project.where}: [method]", project.params)]
    for override in project.overrides:
        if unmatched(override.match):
            warnings.append(f"{override.where} match = {override.match!r} matches no tensor")
        levels.append((override.where, override.params))
    levels += [(ref.where, ref.params) for ref in project.models.values()]
    for piece in project.slices or []:
        levels.append((piece.where, piece.params))
        levels += [(source.where, source.params) for source in piece.sources]
    for where, params in levels:
        for key, setting in params.items():
            for filt in filters(setting):
                if unmatched(filt):
                    warnings.append(f"{where}: parameter '{key}' filter {filt!r} matches no tensor")
    return warnings
