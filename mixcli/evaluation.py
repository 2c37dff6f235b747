"""Running evaluators on a model folder or a resident model, and showing what they measured."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import MixcliError, closest
from .params import NOTHING, check_setting, resolve


@dataclass
class EvalContext:
    """What an :class:`mixcli.Evaluator` receives: a model folder, or a resident model.

    Evaluators get the model through :meth:`load_model` and :meth:`load_tokenizer`, and its
    config through :meth:`config`, so they measure either alike."""

    model_path: Path  # the folder to measure (for a resident model: only its name in messages)
    params: dict  # the evaluator's parameters, by field name
    models: dict[str, Path] = field(default_factory=dict)  # the project's models (for per-task heads)
    base_dir: Path = Path(".")  # relative data paths are resolved against this
    device: str = "cpu"
    show_progress: bool = True
    model: Any = None  # a resident transformers model to measure instead of model_path
    tokenizer_path: Path | None = None  # where a resident model's tokenizer is saved

    def path(self, value: str) -> Path:
        """A data path from the parameters, relative to the project file."""
        path = Path(value).expanduser()
        return path if path.is_absolute() else self.base_dir / path

    def progress(self, total: int, unit: str = "samples"):
        """A progress bar (:mod:`mixcli.progress`) for this evaluation, gone once it is done."""
        from .progress import progress

        return progress(f"evaluating {self.model_path.name}", total, unit, enabled=self.show_progress,
                        transient=True)

    def load_model(self, auto_class: str, dtype: str | None = None):
        """The model to measure as ``auto_class`` (e.g. ``"AutoModelForCausalLM"``), on the
        context's device, in eval mode and in ``dtype`` when given: the resident model (moved in
        place; a cast copy when ``dtype`` differs from its own), or loaded from the folder."""
        import torch

        torch_dtype = getattr(torch, dtype) if dtype else None
        if self.model is None:
            kwargs = {"dtype": torch_dtype} if torch_dtype is not None else {}
            return load_model(auto_class, self.model_path, **kwargs).to(self.device).eval()
        model = resident_as(self.model, auto_class, self.model_path)
        if torch_dtype is not None and model.dtype != torch_dtype:
            # a copy: casting the resident model in place would change what the next
            # evaluator (or fitness term) measures, and a bfloat16 round trip is lossy
            import copy

            model = copy.deepcopy(model).to(torch_dtype)
        return model.to(self.device).eval()

    def load_tokenizer(self):
        """The tokenizer of the model measured (saved beside it, or the resident model's)."""
        if self.model is None:
            return load_tokenizer(self.model_path)
        folder = self.tokenizer_path or getattr(self.model, "mixcli_tokenizer_path", None)
        if folder is None:
            raise MixcliError(f"{self.model_path}: the model in memory has no tokenizer folder; give "
                              "the folder of the tokenizer it uses (tokenizer_path)")
        return load_tokenizer(Path(folder))

    def config(self) -> dict:
        """The model's config, as its config.json holds it."""
        if self.model is None:
            from .checkpoint import read_config

            return read_config(self.model_path, str(self.model_path))
        return self.model.config.to_dict()


def resident_as(model, auto_class: str, where) -> Any:
    """A resident model as ``auto_class`` would load it: itself, or for ``AutoModel`` its bare
    backbone (a model with a head holds one); a one-line error otherwise."""
    import transformers

    mapping = getattr(transformers, auto_class)._model_mapping
    wanted = mapping[type(model.config)] if type(model.config) in mapping else None
    if wanted is None:
        raise MixcliError(f"{where}: a '{model.config.model_type}' model has no {auto_class} class, which this "
                          "evaluator needs; evaluate it with an evaluator for its kind of model")
    if isinstance(model, wanted):
        return model
    backbone = getattr(model, "base_model", None)
    if auto_class == "AutoModel" and isinstance(backbone, wanted):
        return backbone
    raise MixcliError(f"{where}: the model in memory is a {type(model).__name__}, but this evaluator "
                      f"measures a {wanted.__name__} ({auto_class}); build it as that class")


def check_params(evaluator, settings: dict, where: str, hint: str = "") -> dict:
    """``settings`` (an evaluator's parameters by key) checked against its specs: one-line errors
    for an unknown key, a wrong value or a missing required one (``hint``, formatted with the ``key``, says how to give it)."""
    specs = evaluator.param_specs
    checked = {}
    for key, setting in settings.items():
        if key not in specs:
            raise MixcliError(f"{where}: unknown parameter '{key}' for evaluator '{evaluator.name}'"
                              f"{closest(key, specs)}")
        checked[key] = check_setting(specs[key], setting, where)
    for key, spec in specs.items():
        if spec.required and key not in checked:
            raise MixcliError(f"{where}: evaluator '{evaluator.name}' needs '{key}' ({spec.help}){hint.format(key=key)}")
    return checked


def resolve_params(evaluator, settings: dict, where: str) -> dict:
    settings.update(check_params(evaluator, settings, where, "; give it with --param {key}=VALUE"))
    return {spec.field: resolve(spec, [settings.get(key, NOTHING)], "", 0.0, where)
            for key, spec in evaluator.param_specs.items()}


def run_evaluator(evaluator, model_path: Path | None, settings: dict, where: str, models=None,
                  base_dir: Path = Path("."), device: str = "cpu", *, model=None,
                  tokenizer_path: Path | None = None, show_progress: bool = True) -> dict:
    """Run ``evaluator`` on the folder ``model_path``, or on the resident ``model`` (a
    transformers model, e.g. from :func:`mixcli.inmemory.build_model`; ``model_path`` then
    only names it, and ``tokenizer_path`` is its tokenizer's folder when the model does not
    say). Returns the metrics."""
    from .plugins import register_architectures

    register_architectures()
    if model is None:
        check_model_folder(Path(model_path))
        check_architecture(Path(model_path))
    from .progress import quiet_libraries

    quiet_libraries()  # per-model "Loading weights" bars drown the results table
    name = Path(model_path) if model_path is not None else Path("in-memory model")
    context = EvalContext(name, resolve_params(evaluator, dict(settings), where), dict(models or {}),
                          Path(base_dir), device, show_progress, model=model,
                          tokenizer_path=Path(tokenizer_path) if tokenizer_path is not None else None)
    metrics = evaluator.evaluate(context)
    if not isinstance(metrics, dict):
        raise RuntimeError(f"evaluator '{evaluator.name}' returned {type(metrics).__name__}, not a dict")
    return metrics


def check_model_folder(model_path: Path) -> dict:
    """A folder an evaluator can measure: a config.json naming a model_type, and weights beside
    it. Returns the config; one-line errors otherwise."""
    config_file = model_path / "config.json"
    if not config_file.is_file():
        raise MixcliError(f"{model_path}: not a model folder (no config.json); give a folder written by "
                          "save_pretrained or mixcli merge")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as error:
        raise MixcliError(f"{config_file}: cannot be read as JSON ({error})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise MixcliError(f"{config_file}: no model_type, so it is not the config of a transformers model")
    if not any(model_path.glob("*.safetensors")) and not any(model_path.glob("pytorch_model*.bin")):
        raise MixcliError(f"{model_path}: has a config.json but no weights (no *.safetensors or "
                          "pytorch_model.bin); give the folder the whole model was saved to")
    return config


def load_model(auto_class: str, model_path: Path, **kwargs):
    """``transformers.<auto_class>.from_pretrained(model_path, **kwargs)`` for measuring it, or a
    one-line error: a model type that needs its own code (mixcli never runs it), anything
    transformers refuses, and any weight the model needs that the folder lacks, since
    transformers would initialise it randomly and the score would measure noise."""
    import transformers
    from transformers.utils import logging as hf_logging

    config = check_model_folder(model_path)
    model_type = config["model_type"]
    if auto_class == "AutoModel" and any(model_path.glob("*.safetensors")):
        from .checkpoint import open_safetensors
        from .features import pooler_kwargs

        # a backbone saved without its pooler is loaded without one, not with a random one
        kwargs = {**pooler_kwargs(config, open_safetensors(model_path, str(model_path))), **kwargs}
    if model_type not in transformers.CONFIG_MAPPING:
        if config.get("auto_map"):
            raise MixcliError(f"{model_path}: model type '{model_type}' needs the Python code shipped with the "
                              "model (auto_map in config.json), which mixcli does not run; use a model of a "
                              "transformers architecture or a mixcli plugin that provides this one")
        raise MixcliError(f"{model_path}: transformers {transformers.__version__} does not know model type "
                          f"'{model_type}'; install a mixcli plugin or a transformers version that provides it")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report would precede our own, clearer error
    try:
        model, info = getattr(transformers, auto_class).from_pretrained(model_path, output_loading_info=True,
                                                                        **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        if "Unrecognized configuration class" in reason:
            raise MixcliError(f"{model_path}: a '{model_type}' model has no {auto_class} class, which this "
                              "evaluator needs; evaluate it with an evaluator for its kind of model") from None
        raise MixcliError(f"{model_path}: transformers cannot load it as {auto_class} ({reason})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        names = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        hint = "save the model with them"
        if all(name.startswith("pooler.") for name in missing):
            hint = ("it was saved without its pooler (add_pooling_layer=False) but the heads read the pooler "
                    "output: save the backbone with its pooler")
        raise MixcliError(f"{model_path}: {len(missing)} weight(s) of {type(model).__name__} are not in the "
                          f"saved model and would be randomly initialised ({names}); {hint}")
    return model


def load_tokenizer(model_path: Path):
    """The tokenizer saved beside a model, or a one-line error."""
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError, KeyError, TypeError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise MixcliError(f"{model_path}: no usable tokenizer ({reason}); copy the tokenizer files of the "
                          "model into it") from None


def check_architecture(model_path: Path) -> None:
    """A model whose config names the mixcli plugin providing its architecture (``mixcli_plugin``)
    fails with a one-line "install it" error when transformers does not know its model type."""
    try:
        config = json.loads((model_path / "config.json").read_text())
    except (OSError, ValueError):
        return
    plugin, model_type = config.get("mixcli_plugin"), config.get("model_type")
    if not plugin or not model_type:
        return
    from transformers import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        raise MixcliError(f"{model_path}: model type '{model_type}' is provided by the mixcli plugin "
                          f"'{plugin}', which is not installed; install it (pip install {plugin})")


def evaluate_project(project, model_path: Path, registry, device: str = "cpu") -> list[dict]:
    """Run the project's [[evaluation]] entries on ``model_path``; write ``<output>.eval.json``."""
    models = {name: ref.resolved_path for name, ref in project.models.items()}
    rows = []
    for spec in project.evaluations:
        evaluator = registry.evaluators[spec.evaluator]
        metrics = run_evaluator(evaluator, model_path, spec.params, spec.where, models,
                                project.file.resolve().parent, device)
        rows.append({"model": str(model_path), "evaluator": spec.evaluator, "metrics": metrics})
    write_results(rows, Path(str(model_path).rstrip("/") + ".eval.json"))
    return rows


def write_results(rows: list[dict], path: Path) -> None:
    path.write_text(json.dumps(rows, indent=2, default=float) + "\n")


def render_results(rows: list[dict], console) -> None:
    from rich.table import Table

    table = Table(title="evaluation")
    for column in ("model", "evaluator", "metric", "value"):
        table.add_column(column, overflow="fold")
    for row in rows:
        for metric, value in row["metrics"].items():
            shown = f"{value:.4f}" if isinstance(value, float) else str(value)
            table.add_row(Path(row["model"]).name, row["evaluator"], metric, shown)
    console.print(table)
