"""What the CLI calls: load and check a project, open its models, plan, write."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__
from .checkpoint import Checkpoint
from .components import MergeMethod, Upscaler
from .errors import MixcliError
from .params import NOTHING, resolve
from .plan import BuildContext, OutputPlan
from .plugins import Registry, get_registry
from .project import Project, check, read_project, unmatched_filters


@dataclass
class Prepared:
    """A project checked against the registry, its models opened and its plan made."""

    project: Project
    method: MergeMethod | Upscaler
    models: dict[str, Checkpoint]
    plan: OutputPlan | dict[str, OutputPlan]  # a dict: several output models, by subfolder
    registry: Registry
    warnings: list[str] = field(default_factory=list)  # about the project; the plans keep their own

    @property
    def plans(self) -> dict[str, OutputPlan]:
        return self.plan if isinstance(self.plan, dict) else {"": self.plan}

    def all_warnings(self) -> list[str]:
        return self.warnings + [w for plan in self.plans.values() for w in plan.warnings]


def load_project(path: str | Path, registry: Registry | None = None,
                 text: str | None = None) -> tuple[Project, object]:
    registry = registry or get_registry()
    project = read_project(path, text)
    return project, check(project, registry)


def open_models(project: Project, registry: Registry) -> dict[str, Checkpoint]:
    """Open every model of the project (configs and headers only)."""
    return {name: open_model(ref, registry) for name, ref in project.models.items()}


def open_model(ref, registry: Registry) -> Checkpoint:
    """Open one model reference with its own loader, or the first that accepts it."""
    if ref.loader is not None:
        loader = registry.loaders.get(ref.loader)
        if loader is None:
            raise MixcliError(f"{ref.where}: unknown loader '{ref.loader}'; known: "
                              f"{', '.join(registry.loaders)}")
    else:
        # plugins' loaders are asked before built-ins
        loader = next((item for item in list(registry.loaders.values())[::-1] if item.accepts(ref)), None)
        if loader is None:
            extra = (f" with lora = '{ref.lora}' (install a plugin that applies LoRA adapters, "
                     "e.g. mixcli-lora)" if ref.lora else "")
            raise MixcliError(f"{ref.where}: no model loader accepts '{ref.path}'{extra}")
    return loader.load(ref)


def build_plan(project: Project, method, models: dict[str, Checkpoint]) -> OutputPlan | dict[str, OutputPlan]:
    if isinstance(method, MergeMethod):
        from .tensorwise import plan_merge

        return plan_merge(project, method, models)
    if project.overrides:
        raise MixcliError(f"{project.overrides[0].where}: per-tensor overrides apply to tensor-wise merges; "
                          f"method '{method.name}' takes its parameters from [method] and [models] only")
    if project.slices is not None:
        raise MixcliError(f"{project.where}: [[slices]] apply to tensor-wise merges; method '{method.name}' "
                          "describes its layers in its own parameters")
    if project.tokenizer is not None:
        raise MixcliError(f"{project.tokenizer.where}: vocabulary alignment applies to tensor-wise merges; "
                          f"method '{method.name}' takes its models' vocabulary as it is")
    specs = method.param_specs
    count = len(models)
    if count < method.min_inputs or (method.max_inputs is not None and count > method.max_inputs):
        raise MixcliError(f"{project.where}: [models] method '{method.name}' takes "
                          f"{method.min_inputs}..{method.max_inputs or 'any'} models, got {count}")
    params, model_params = whole_model_params(project, specs)
    context = BuildContext(project=project, models=models, params=params, model_params=model_params,
                           seed=project.seed, sections=project.sections)
    return method.build(context)


def whole_model_params(project: Project, specs: dict) -> tuple[dict, dict]:
    """Parameters of a method that is not tensor-wise, by field name: the shared ones from
    [method] (or the default), the per-model ones from the model's table, then [method]."""
    params = {}
    model_params = {name: {} for name in project.models}
    for key, spec in specs.items():
        if spec.per_model:
            for name, ref in project.models.items():
                levels = [ref.params.get(key, NOTHING), project.params.get(key, NOTHING)]
                model_params[name][spec.field] = resolve(spec, levels, "", 0.0, ref.where)
        else:
            params[spec.field] = resolve(spec, [project.params.get(key, NOTHING)], "", 0.0,
                                         f"{project.where}: [method]")
    return params, model_params


def prepare(path: str | Path, text: str | None = None) -> Prepared:
    registry = get_registry()
    project, method = load_project(path, registry, text)
    models = open_models(project, registry)
    plan = build_plan(project, method, models)
    prepared = Prepared(project, method, models, plan, registry)
    names = {name for one in prepared.plans.values() for tensor in one.tensors
             for name in [tensor.name, *(read for _, read in tensor.reads)]}
    prepared.warnings += unmatched_filters(project, names)
    return prepared


def recipe(project: Project) -> str:
    """The project as written into its output (``mixcli.toml``): the same recipe, with each local
    model's path absolute and the output path ``"."`` (the folder holding it), so that
    ``mixcli merge OUT/mixcli.toml --out NEW`` rebuilds the model from any working directory."""
    import tomli

    from .tomlwrite import dumps

    def absolute(local: Path, as_written: str) -> str:
        # a Hub id, or a reference a plugin's loader resolves: as written
        return os.path.normpath(local.absolute()) if local.exists() else as_written

    data = tomli.loads(project.text)
    for name, entry in data.get("models", {}).items():
        ref = project.models[name]
        path = absolute(ref.resolved_path, ref.path)
        if ref.lora:  # "model+adapter" too: as a table, the adapter's path absolute as well
            entry = dict(entry) if isinstance(entry, dict) else {}
            entry.update(path=path, lora=absolute(ref.project_dir / Path(ref.lora).expanduser(), ref.lora))
            data["models"][name] = entry
        elif isinstance(entry, dict):
            entry["path"] = path
        else:
            data["models"][name] = path
    _absolute_files(data, project, absolute)
    data.setdefault("output", {})["path"] = "."
    return (f"# The recipe of this model (mixcli {__version__}); model paths are absolute and the output\n"
            "# is this folder: `mixcli merge mixcli.toml --out NEW` rebuilds it.\n" + dumps(data))


def _absolute_files(data: dict, project: Project, absolute) -> None:
    """Parameters that name a file (prompts files...) absolute too, on models and under [method]."""
    try:
        specs = get_registry().methods[project.method].param_specs
    except KeyError:
        return
    folder = project.file.resolve().parent
    tables = [data.get("method", {})] + [entry for entry in data.get("models", {}).values() if isinstance(entry, dict)]
    for table in tables:
        for key, value in table.items():
            spec = specs.get(key)
            if spec is not None and spec.file and isinstance(value, str) and value:
                table[key] = absolute(folder / Path(value).expanduser(), value)


def model_card(prepared: Prepared, recipe_text: str | None = None, step: str = "", title: str | None = None) -> str:
    """The output's README.md: where it came from, and the recipe (:func:`recipe`) in full."""
    notes = [note for plan in prepared.plans.values() for note in plan.notes]
    return card(prepared.project, prepared.registry, recipe_text, notes, step, title)


def card(project: Project, registry: Registry, recipe_text: str | None = None, notes=(), step: str = "",
         title: str | None = None) -> str:
    """A model card for a model the project made; ``step`` says what a later command (training,
    adaptation) did to the merge output and how to repeat it, for models written by plugins;
    ``title`` is the model's folder name when it is not the project's output."""
    recipe_text = recipe(project) if recipe_text is None else recipe_text
    provider = registry.provider.get(("method", project.method))
    package = f"{provider.package} {provider.version}" if provider else "unknown"
    sources = "\n".join(f"- `{name}`: `{ref.path}`" + (f" + LoRA `{ref.lora}`" if ref.lora else "")
                        for name, ref in project.models.items())
    bases = "".join(f"\n- {ref.path}" for ref in project.models.values())
    notes = "## Notes\n" + "".join(f"- {note}\n" for note in notes) + "\n" if notes else ""
    rebuild = step or ("`mixcli merge mixcli.toml --out NEW` reproduces this model from the same inputs, "
                       "from any working directory.")
    return f"""---
library_name: transformers
tags:
- mixcli
- merge
base_model:{bases}
---
# {title or Path(project.output_path or 'merged').name}

Made with mixcli {__version__} on {datetime.date.today().isoformat()} by the method
`{project.method}` (from {package}), seed {project.seed}.

## Models
{sources}

{notes}## Project
The complete recipe, also saved as `mixcli.toml` beside this card; {rebuild}

```toml
{recipe_text.rstrip()}
```
"""


def _summary(values: list):
    """One value, or its range over the tensors where it varies (gradients, filters)."""
    distinct = []
    for value in values:
        if value not in distinct:
            distinct.append(value)
    if len(distinct) == 1:
        return distinct[0]
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in distinct):
        return f"{min(distinct):g}..{max(distinct):g} (varies by tensor)"
    return f"{', '.join(map(str, distinct))} (varies by tensor)"


def resolved_parameters(prepared: Prepared) -> tuple[dict, dict]:
    """Every parameter as the merge will use it: shared ones, and per-model ones by model.
    Tensor-wise merges report what their tensors resolved to (a range where it varies)."""
    specs = prepared.method.param_specs
    names = {spec.field: spec.name for spec in specs.values()}
    if not isinstance(prepared.method, MergeMethod):
        params, model_params = whole_model_params(prepared.project, specs)
        per_model = {model: {names[f]: v for f, v in values.items()} for model, values in model_params.items()}
        return {names[f]: v for f, v in params.items()}, {m: v for m, v in per_model.items() if v}
    shared: dict[str, list] = {}
    per_model: dict[str, dict[str, list]] = {}
    for plan in prepared.plans.values():
        for tensor in plan.tensors:
            details = tensor.details
            for spec in specs.values():
                if spec.field not in details:
                    continue
                if spec.per_model:
                    for model, value in zip(details.get("models", []), details[spec.field]):
                        per_model.setdefault(model, {}).setdefault(spec.name, []).append(value)
                else:
                    shared.setdefault(spec.name, []).append(details[spec.field])
    return ({k: _summary(v) for k, v in shared.items()},
            {m: {k: _summary(v) for k, v in values.items()} for m, values in per_model.items()})


def _settings(prepared: Prepared, plans: list) -> dict:
    """The [method] / [output] settings that decide the written bytes besides the parameters."""
    project = prepared.project
    settings = {"seed": project.seed} if getattr(prepared.method, "random", False) else {}
    for key, value in (("dtype", project.dtype), ("compute_dtype", project.compute_dtype)):
        if value:
            settings[key] = value
    from .plan import output_dtype_name

    floats = ("F64", "F32", "F16", "BF16")  # integer buffers keep their safetensors code
    written = sorted({output_dtype_name(t.dtype) if t.dtype in floats else t.dtype
                      for plan in plans for t in plan.tensors})
    settings["written dtype"] = ", ".join(written) if written else "-"
    return settings


def describe(prepared: Prepared, workers: int) -> dict:
    """The plan in numbers, for --dry-run and validate."""
    plans = list(prepared.plans.values())
    shared, per_model = resolved_parameters(prepared)
    return {
        "method": prepared.project.method,
        "models": {name: str(ckpt.path) + (f" + {ckpt.extra['lora']}" if "lora" in ckpt.extra else "")
                   for name, ckpt in prepared.models.items()},
        "base": prepared.project.base,
        "parameters": shared,
        "model_parameters": per_model,
        "settings": _settings(prepared, plans),
        "outputs": [name or "." for name in prepared.plans],
        "tensors": sum(len(plan.tensors) for plan in plans),
        "input_bytes": sum(plan.input_bytes for plan in plans),
        "output_bytes": sum(plan.output_bytes for plan in plans),
        "peak_memory_bytes": max(plan.peak_bytes(workers) for plan in plans),
        "layers": plans[0].config.get("num_hidden_layers"),
        "output": str(prepared.project.output_path) if prepared.project.output_path else None,
        "notes": [note for plan in plans for note in plan.notes],
    }
