"""A project's model built in memory: the plan of ``mixcli merge`` computed by the same engine
and the same compute code, into tensors instead of files. Nothing is written to disk.

* :func:`build` — the tensors, the config the merge would write, where the tokenizer is;
* :func:`build_state_dict` — the tensors only;
* :func:`build_model` — a resident transformers model holding them (no copy), or a previous
  candidate's model with its tensors overwritten in place (a search's inner loop).

The tensors are bitwise those ``mixcli merge`` writes. A tensor the plan copies unchanged is
copied once out of its source file, so the result never aliases a model's memory map.
Tensor-wise merges compute on the project's device (``[output] device``), as the merge does;
``device`` is where the results are kept.
"""

from __future__ import annotations

import contextlib
import mmap
import sys
import threading
from dataclasses import dataclass, field
from math import prod
from pathlib import Path

from .errors import MixcliError
from .plan import OutputPlan
from .project import Project, check
from .safetensors_io import torch_dtype

__all__ = ["Built", "build", "build_state_dict", "build_model", "compute", "model_from_state_dict", "plan_in_memory"]


@dataclass
class Built:
    """One candidate model in memory."""

    config: dict  # config.json as the merge writes it
    tensors: dict  # name -> torch.Tensor, in the plan's order
    tokenizer_path: Path | None  # the folder whose tokenizer the merge copies (None: none, or its own)
    warnings: list[str] = field(default_factory=list)  # odd but legal things in the project and its plan


ALIGN = 64  # bytes between tensors in the arena
_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", 14 if sys.platform == "linux" else 0)
_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23 if sys.platform == "linux" else 0)
_STEP = 64 * 2**20


class _Arena:
    """One private anonymous mapping holding the tensors computed in place (``fill``), in plan
    order. A background thread faults its pages in ahead of the compute, in huge pages where
    the kernel allows, as the disk merge prepares its output's page cache ahead: the compute
    threads then write into memory that is there, instead of faulting it in 4 KiB at a time."""

    def __init__(self, sizes: dict[str, int]):
        self.offsets, total = {}, 0
        for name, nbytes in sizes.items():
            self.offsets[name] = total
            total += -(-nbytes // ALIGN) * ALIGN
        self.map = mmap.mmap(-1, max(total, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._populate, name="mixcli-arena", daemon=True)
        self._thread.start()

    def _populate(self) -> None:
        try:
            if _HUGEPAGE:
                self.map.madvise(_HUGEPAGE)
            for start in range(0, len(self.map), _STEP) if _POPULATE_WRITE else ():
                if self._stopping.is_set():
                    return
                self.map.madvise(_POPULATE_WRITE, start, min(_STEP, len(self.map) - start))
        except OSError:  # older kernels: the pages fault in as they are written
            pass

    def tensor(self, name: str, dtype, shape):
        import torch

        count = prod(shape) * dtype.itemsize
        return torch.frombuffer(self.map, dtype=torch.uint8, count=count, offset=self.offsets[name]) \
            .view(dtype).view(shape)

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join()


class _MemoryWriter:
    """The engine's writer for tensors kept in memory (the protocol of ShardedWriter): tensors
    computed in place go into an arena on the CPU, computed ones are kept as they are, and
    those ``into`` holds (name -> a tensor of the planned shape and dtype on ``device``) are
    overwritten in place instead."""

    def __init__(self, plan: OutputPlan, device: str, into: dict | None = None):
        import torch

        self.device = torch.device(device)
        self.planned = {t.name: t for t in plan.tensors}
        self.tensors: dict = {}
        self.into = {name: tensor for name, tensor in (into or {}).items()
                     if name in self.planned and _fits(tensor, self.planned[name], self.device)}
        filled = {t.name: t.nbytes for t in plan.tensors if t.fill is not None and t.nbytes and t.name not in self.into}
        self.arena = _Arena(filled) if filled and self.device.type == "cpu" else None

    def mapped(self, name: str) -> bool:
        return bool(self.planned[name].nbytes)

    @contextlib.contextmanager
    def destination(self, name: str):
        import torch

        planned = self.planned[name]
        dtype = torch_dtype(planned.dtype)
        if name in self.into and self.device.type == "cpu":
            target = self.into[name]
        elif self.arena is not None and name in self.arena.offsets:
            target = self.arena.tensor(name, dtype, planned.shape)
        else:
            target = torch.empty(planned.shape, dtype=dtype)
        yield target
        self._keep(name, target)

    def write(self, name: str, tensor) -> None:
        planned = self.planned[name]
        data = tensor.detach()
        if data.numel() * data.element_size() != planned.nbytes:
            raise RuntimeError(f"tensor '{name}' has {data.numel() * data.element_size()} bytes, "
                               f"{planned.nbytes} were planned")
        # the bytes the file would hold, read back as the planned dtype and shape
        data = data.contiguous().view(torch_dtype(planned.dtype)).view(planned.shape)
        if name not in self.into and data.device == self.device and not data.untyped_storage().resizable():
            # memory torch did not allocate: a source file's map (a tensor copied as is), whose
            # pages the engine releases, or another library's buffer. The candidate owns a copy.
            data = data.clone()
        self._keep(name, data)

    def _keep(self, name: str, data) -> None:
        kept = self.into.get(name)
        if kept is None:
            self.tensors[name] = data if data.device == self.device else data.to(self.device)
            return
        if kept is not data:
            kept.copy_(data)
        self.tensors[name] = kept

    def close(self) -> None:
        if self.arena is not None:
            self.arena.stop()


def _fits(tensor, planned, device) -> bool:
    return (tuple(tensor.shape) == tuple(planned.shape) and tensor.dtype == torch_dtype(planned.dtype)
            and tensor.device == device and tensor.is_contiguous())


def plan_in_memory(project: Project) -> tuple[OutputPlan, list[str]]:
    """``project`` checked (like ``mixcli merge``) and planned for a build in memory: its plan
    and the warnings about the project; one-line errors for what only a disk merge can do."""
    from .core import build_plan, open_models
    from .plugins import get_registry
    from .project import unmatched_filters

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
    return plan, unmatched_filters(project, names)


def compute(plan: OutputPlan, *, device: str = "cpu", workers: int | None = None, progress: bool = False,
            into: dict | None = None) -> dict:
    """Every tensor of ``plan`` by name, computed by the merge's engine, on ``device``; a tensor
    of ``into`` with the planned name, shape and dtype there is overwritten in place and returned."""
    from .engine import default_workers, merge_threads, run_plan

    workers = workers or default_workers()
    writer = _MemoryWriter(plan, device, into)
    try:
        with merge_threads(workers):
            run_plan(plan, writer, workers, progress)
    finally:
        writer.close()
    return {t.name: writer.tensors[t.name] for t in plan.tensors}


def _tokenizer_path(plan: OutputPlan) -> Path | None:
    return None if plan.own_tokenizer or plan.donor is None else plan.donor.path


def build(project: Project, *, device: str = "cpu", workers: int | None = None,
          progress: bool = False, into: dict | None = None) -> Built:
    """Build ``project``'s model in memory (checked first, like ``mixcli merge``); ``into``: as
    for :func:`compute`."""
    from .engine import require_device

    require_device(device, f"{project.where}: device")
    plan, warnings = plan_in_memory(project)
    tensors = compute(plan, device=device, workers=workers, progress=progress, into=into)
    return Built(dict(plan.config), tensors, _tokenizer_path(plan), warnings + list(plan.warnings))


def build_state_dict(project: Project, *, device: str = "cpu", workers: int | None = None) -> dict:
    """The tensors ``mixcli merge`` would write for ``project``, by name, on ``device``."""
    return build(project, device=device, workers=workers).tensors


def build_model(project: Project, *, device: str = "cpu", workers: int | None = None,
                auto_class: str | None = None, model=None):
    """``project``'s model as a resident transformers model (eval mode) on ``device``, with the
    config the merge writes and the tensors of :func:`build_state_dict`; its tokenizer folder
    is ``model.mixcli_tokenizer_path``.

    ``model``: one this function returned before (another recipe of a search). When the new
    recipe gives it the same config and its tensors still have the planned dtypes, its tensors
    are overwritten in place and it is returned: no memory is allocated or faulted in, and no
    model is made. Otherwise a new model is made."""
    from .engine import require_device

    require_device(device, f"{project.where}: device")
    plan, _ = plan_in_memory(project)
    if model is not None and getattr(model, "mixcli_config", None) == plan.config:
        into = model.state_dict()
        if all(t.name in into and _fits(into[t.name], t, model.device) for t in plan.tensors) \
                and model.device == _device(device):
            compute(plan, device=device, workers=workers, into=into)
            model.mixcli_tokenizer_path = _tokenizer_path(plan)
            return model.eval()
    tensors = compute(plan, device=device, workers=workers)
    model = model_from_state_dict(dict(plan.config), tensors, auto_class, where=project.where)
    model.mixcli_config = dict(plan.config)
    model.mixcli_tokenizer_path = _tokenizer_path(plan)
    return model


def _device(name: str):
    import torch

    return torch.device(name)


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
