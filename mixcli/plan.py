"""Plans: which output tensors to write and how each is computed, decided from configs and
safetensors headers alone, so every mistake surfaces before a weight is read."""

from __future__ import annotations

from dataclasses import dataclass, field
from math import prod
from pathlib import Path
from typing import Any, Callable

# tensor roles live in .architecture; these names stay importable from here for plugins
from .architecture import is_pre_layer, layer_templates, split_layer_name  # noqa: F401
from .checkpoint import Checkpoint
from .errors import Warnings
from .project import Project
from .safetensors_io import ITEM_SIZE



def all_finite(tensor) -> bool:
    """No NaN or Inf in ``tensor`` (checked in chunks, so the boolean temporary stays small)."""
    import torch

    flat = tensor.reshape(-1)
    step = 1 << 22
    return all(bool(torch.isfinite(flat[i:i + step]).all()) for i in range(0, flat.numel(), step))


def nonfinite_message(ckpt, name: str) -> str:
    return f"model '{ckpt.name}' ({ckpt.path}): tensor '{name}' holds NaN or Inf values"


@dataclass
class OutputTensor:
    """One tensor of the output: its name, shape and dtype, and how to compute it."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors code of the written tensor
    compute: Callable[[], Any]
    reads: list[tuple[Checkpoint, str]] = field(default_factory=list)
    details: dict = field(default_factory=dict)  # resolved parameters, for --dry-run and the card
    # optional: computes the tensor into a given one of this shape and dtype, in place; the
    # engine then hands it the output file's own bytes, saving a result buffer and a copy
    fill: Callable[[Any], None] | None = None
    work_bytes: int | None = None  # working memory beyond the inputs, when the method declares it
    intra_op: bool = False  # computed alone, with all cores (large linear algebra)

    @property
    def nbytes(self) -> int:
        return prod(self.shape) * ITEM_SIZE[self.dtype]

    @property
    def input_bytes(self) -> int:
        return sum(ckpt.tensors[name].nbytes for ckpt, name in self.reads)


@dataclass
class OutputPlan:
    """What the engine writes: config, tensors, and the donor of tokenizer files."""

    config: dict
    tensors: list[OutputTensor]
    donor: Checkpoint | None = None
    extra_files: dict[str, bytes] = field(default_factory=dict)
    finalize: Callable[[Path], None] | None = None  # last step inside the temporary folder
    notes: list[str] = field(default_factory=list)
    own_tokenizer: bool = False  # extra_files hold the output tokenizer: the donor's is not copied
    # odd but legal things found while planning or writing (NaN inputs...), shown by the CLI
    warnings: Warnings = field(default_factory=Warnings)

    @property
    def output_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def input_bytes(self) -> int:
        return sum(t.input_bytes for t in self.tensors)

    def peak_bytes(self, workers: int) -> int:
        """Working memory the engine allows itself for this plan (see engine.MEMORY_BUDGET)."""
        from .engine import MEMORY_BUDGET, working_bytes

        costs = sorted((working_bytes(t) for t in self.tensors), reverse=True)
        return max(costs[0], min(MEMORY_BUDGET, sum(costs[:workers]))) if costs else 0


@dataclass
class BuildContext:
    """What an :class:`mixcli.Upscaler` receives."""

    project: Project
    models: dict[str, Checkpoint]
    params: dict  # shared parameters, by field name
    model_params: dict[str, dict]  # per-model parameters, model name -> field name -> value
    seed: int
    device: str = "cpu"
    sections: dict = field(default_factory=dict)  # the method's own top-level tables


def set_dtype(config: dict, dtype: str) -> None:
    present = [k for k in ("dtype", "torch_dtype") if k in config]
    for key in present or ["dtype"]:
        config[key] = dtype


def output_dtype_name(code: str) -> str:
    return {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}.get(code, "float32")
