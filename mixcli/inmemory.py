"""A project's model built in memory: the plan of ``mixcli merge`` computed by the same engine
and the same compute code, into tensors instead of files. Nothing is written to disk.

* :func:`build` — the tensors, the config the merge would write, where the tokenizer is;
* :func:`build_state_dict` — the tensors only;
* :func:`build_model` — a resident transformers model holding them (no copy).

The tensors are bitwise those ``mixcli merge`` writes. A tensor the plan copies unchanged is
copied once out of its source file, so the result never aliases a model's memory map.
Tensor-wise merges compute on the project's device (``[output] device``), as the merge does;
``device`` is where the results are kept.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

from .errors import MixcliError
from .plan import OutputPlan
from .project import Project, check
from .safetensors_io import torch_dtype

__all__ = ["Built", "build", "build_state_dict", "build_model", "model_from_state_dict"]


@dataclass
class Built:
    """One candidate model in memory."""

    config: dict  # config.json as the merge writes it
    tensors: dict  # name -> torch.Tensor, in the plan's order
    tokenizer_path: Path | None  # the folder whose tokenizer the merge copies (None: none, or its own)
    warnings: list[str] = field(default_factory=list)  # odd but legal things in the project and its plan


class _MemoryWriter:
    """The engine's writer for tensors kept in memory (the protocol of ShardedWriter)."""

    def __init__(self, plan: OutputPlan, device: str):
        import torch

        self.device = torch.device(device)
        self.planned = {t.name: t for t in plan.tensors}
        self.tensors: dict = {}

    def mapped(self, name: str) -> bool:
        return bool(self.planned[name].nbytes)

    @contextlib.contextmanager
    def destination(self, name: str):
        import torch

        planned = self.planned[name]
        target = torch.empty(planned.shape, dtype=torch_dtype(planned.dtype))
        yield target
        self.tensors[name] = target if self.device.type == "cpu" else target.to(self.device)

    def write(self, name: str, tensor) -> None:
        planned = self.planned[name]
        data = tensor.detach()
        if data.numel() * data.element_size() != planned.nbytes:
            raise RuntimeError(f"tensor '{name}' has {data.numel() * data.element_size()} bytes, "
                               f"{planned.nbytes} were planned")
        # the bytes the file would hold, read back as the planned dtype and shape
        data = data.contiguous().view(torch_dtype(planned.dtype)).view(planned.shape)
        if data.device != self.device:
            data = data.to(self.device)
        elif not data.untyped_storage().resizable():
            # memory torch did not allocate: a source file's map (a tensor copied as is), whose
            # pages the engine releases, or another library's buffer. The candidate owns a copy.
            data = data.clone()
        self.tensors[name] = data


def build(project: Project, *, device: str = "cpu", workers: int | None = None,
          progress: bool = False) -> Built:
    """Build ``project``'s model in memory (checked first, like ``mixcli merge``)."""
    from .core import build_plan, open_models
    from .engine import default_workers, merge_threads, require_device, run_plan
    from .plugins import get_registry
    from .project import unmatched_filters

    require_device(device, f"{project.where}: device")
    registry = get_registry()
    method = check(project, registry)
    models = open_models(project, registry)
    plan = build_plan(project, method, models)
    if isinstance(plan, dict):
        raise MixcliError(f"{project.where}: [method] '{project.method}' makes {len(plan)} models "
                          f"({', '.join(plan)}); an in-memory build makes one: merge it to disk instead")
    if plan.finalize is not None:
        raise MixcliError(f"{project.where}: [method] '{project.method}' finishes its output in the "
                          "written folder, so it cannot be built in memory: merge it to disk instead")
    names = {name for tensor in plan.tensors for name in [tensor.name, *(read for _, read in tensor.reads)]}
    warnings = unmatched_filters(project, names)
    workers = workers or default_workers()
    writer = _MemoryWriter(plan, device)
    with merge_threads(workers):
        run_plan(plan, writer, workers, progress)
    tensors = {t.name: writer.tensors[t.name] for t in plan.tensors}
    tokenizer = None if plan.own_tokenizer or plan.donor is None else plan.donor.path
    return Built(dict(plan.config), tensors, tokenizer, warnings + list(plan.warnings))


def build_state_dict(project: Project, *, device: str = "cpu", workers: int | None = None) -> dict:
    """The tensors ``mixcli merge`` would write for ``project``, by name, on ``device``."""
    return build(project, device=device, workers=workers).tensors


def build_model(project: Project, *, device: str = "cpu", workers: int | None = None,
                auto_class: str | None = None):
    """``project``'s model as a resident transformers model (eval mode) on ``device``, with the
    config the merge writes and the tensors of :func:`build_state_dict`; its tokenizer folder
    is ``model.mixcli_tokenizer_path``."""
    built = build(project, device=device, workers=workers)
    model = model_from_state_dict(built.config, built.tensors, auto_class, where=project.where)
    model.mixcli_tokenizer_path = built.tokenizer_path
    return model


def model_class(config, auto_class: str | None = None):
    """The transformers class for a config: the ``auto_class`` mapping's, else the class its
    ``architectures`` names, else the causal LM or the bare model."""
    import transformers

    if auto_class is not None:
        mapping = getattr(transformers, auto_class)._model_mapping
        if type(config) not in mapping:
            raise MixcliError(f"a '{config.model_type}' model has no {auto_class} class")
        return mapping[type(config)]
    for name in getattr(config, "architectures", None) or ():
        if hasattr(transformers, name):
            return getattr(transformers, name)
    for name in ("AutoModelForCausalLM", "AutoModel"):
        mapping = getattr(transformers, name)._model_mapping
        if type(config) in mapping:
            return mapping[type(config)]
    raise MixcliError(f"transformers has no model class for model type '{config.model_type}'")


def model_from_state_dict(config: dict, tensors: dict, auto_class: str | None = None, where: str = "model"):
    """A transformers model of ``config`` (a config.json dict) holding ``tensors`` without
    copying them: what ``from_pretrained`` would give for the written folder, read from no file."""
    import transformers
    from transformers.utils import logging as hf_logging

    from .plugins import register_architectures
    from .progress import quiet_libraries

    register_architectures()
    quiet_libraries()
    model_type = config.get("model_type")
    if model_type not in transformers.CONFIG_MAPPING:
        raise MixcliError(f"{where}: transformers {transformers.__version__} does not know model type "
                          f"'{model_type}'; install the mixcli plugin that provides it")
    settings = {k: v for k, v in config.items() if k not in ("model_type", "transformers_version")}
    hf_config = transformers.CONFIG_MAPPING[model_type].from_dict(settings)
    cls = model_class(hf_config, auto_class)
    first = next(iter(tensors.values()), None)
    dtype = first.dtype if first is not None and first.is_floating_point() else None
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = cls.from_pretrained(None, config=hf_config, state_dict=tensors, dtype=dtype,
                                          output_loading_info=True)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise MixcliError(f"{where}: transformers cannot build {cls.__name__} from the merged tensors "
                          f"({reason})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise MixcliError(f"{where}: {len(missing)} weight(s) of {cls.__name__} are not among the merged "
                          f"tensors and would be randomly initialised ({', '.join(missing[:4])})")
    return model.eval()
