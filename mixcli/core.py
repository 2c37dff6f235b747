"""What the CLI calls: load and check a project, open its models, plan, write."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .checkpoint import Checkpoint
from .components import MergeMethod, Upscaler
from .errors import MixcliError
from .params import NOTHING, resolve
from .plan import BuildContext, OutputPlan
from .plugins import Registry, get_registry
from .project import Project, check, read_project


@dataclass
class Prepared:
    """A project checked against the registry, its models opened and its plan made."""

    project: Project
    method: MergeMethod | Upscaler
    models: dict[str, Checkpoint]
    plan: OutputPlan | dict[str, OutputPlan]  # a dict: several output models, by subfolder
    registry: Registry

    @property
    def plans(self) -> dict[str, OutputPlan]:
        return self.plan if isinstance(self.plan, dict) else {"": self.plan}


def load_project(path: str | Path, registry: Registry | None = None,
                 text: str | None = None) -> tuple[Project, object]:
    registry = registry or get_registry()
    project = read_project(path, text)
    return project, check(project, registry)


def open_models(project: Project, registry: Registry) -> dict[str, Checkpoint]:
    """Open every model of the project (configs and headers only)."""
    models = {}
    loaders = list(registry.loaders.values())[::-1]  # plugins' loaders are asked before built-ins
    for name, ref in project.models.items():
        if ref.loader is not None:
            loader = registry.loaders.get(ref.loader)
            if loader is None:
                raise MixcliError(f"{ref.where}: unknown loader '{ref.loader}'; known: "
                                  f"{', '.join(registry.loaders)}")
        else:
            loader = next((item for item in loaders if item.accepts(ref)), None)
            if loader is None:
                raise MixcliError(f"{ref.where}: no model loader accepts '{ref.path}'")
        models[name] = loader.load(ref)
    return models


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
    params = {}
    model_params = {name: {} for name in models}
    for key, spec in specs.items():
        if spec.per_model:
            for name, ref in project.models.items():
                levels = [ref.params.get(key, NOTHING), project.params.get(key, NOTHING)]
                model_params[name][spec.field] = resolve(spec, levels, "", 0.0, ref.where)
        else:
            params[spec.field] = resolve(spec, [project.params.get(key, NOTHING)], "", 0.0,
                                         f"{project.where}: [method]")
    context = BuildContext(project=project, models=models, params=params, model_params=model_params,
                           seed=project.seed, sections=project.sections)
    return method.build(context)


def prepare(path: str | Path, text: str | None = None) -> Prepared:
    registry = get_registry()
    project, method = load_project(path, registry, text)
    models = open_models(project, registry)
    plan = build_plan(project, method, models)
    return Prepared(project, method, models, plan, registry)


def model_card(prepared: Prepared) -> str:
    project, registry = prepared.project, prepared.registry
    provider = registry.provider.get(("method", project.method))
    package = f"{provider.package} {provider.version}" if provider else "unknown"
    sources = "\n".join(f"- `{name}`: `{ref.path}`" for name, ref in project.models.items())
    bases = "".join(f"\n- {ref.path}" for ref in project.models.values())
    notes = [note for plan in prepared.plans.values() for note in plan.notes]
    notes = "## Notes\n" + "".join(f"- {note}\n" for note in notes) + "\n" if notes else ""
    return f"""---
library_name: transformers
tags:
- mixcli
- merge
base_model:{bases}
---
# {Path(project.output_path or 'merged').name}

Made with mixcli {__version__} on {datetime.date.today().isoformat()} by the method
`{project.method}` (from {package}), seed {project.seed}.

## Models
{sources}

{notes}## Project
The complete recipe, also saved as `mixcli.toml` beside this card; `mixcli merge mixcli.toml`
reproduces this model from the same inputs.

```toml
{project.text.rstrip()}
```
"""


def describe(prepared: Prepared, workers: int) -> dict:
    """The plan in numbers, for --dry-run and validate."""
    plans = list(prepared.plans.values())
    return {
        "method": prepared.project.method,
        "models": {name: str(ckpt.path) for name, ckpt in prepared.models.items()},
        "base": prepared.project.base,
        "parameters": prepared.project.params,
        "outputs": [name or "." for name in prepared.plans],
        "tensors": sum(len(plan.tensors) for plan in plans),
        "input_bytes": sum(plan.input_bytes for plan in plans),
        "output_bytes": sum(plan.output_bytes for plan in plans),
        "peak_memory_bytes": max(plan.peak_bytes(workers) for plan in plans),
        "layers": plans[0].config.get("num_hidden_layers"),
        "output": str(prepared.project.output_path) if prepared.project.output_path else None,
        "notes": [note for plan in plans for note in plan.notes],
    }
