"""A model with a LoRA adapter applied, one tensor at a time: a checkpoint whose changed tensors
compute ``W + s·B@A`` (float32, rounded once to W's dtype, as PEFT's merge_and_unload) when they
are read. No merged copy of the model exists, in memory or on disk."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from math import prod

from mixcli.architecture import head_name, head_source, is_tied
from mixcli.checkpoint import Checkpoint
from mixcli.errors import MixcliError
from mixcli.safetensors_io import ITEM_SIZE, TensorInfo, torch_dtype

from .adapter import Adapter, ModuleLora, read_adapter


@dataclass
class LoraCheckpoint(Checkpoint):
    """A base checkpoint seen through an adapter; the adapter's tokenizer, when it has one,
    is the model's (it may have added tokens)."""

    adapter: Adapter | None = None

    def tokenizer_files(self):
        return (self.adapter.tokenizer_files() if self.adapter else []) or super().tokenizer_files()


class _Applied:
    """What a changed tensor reads from: the base's (or the adapter's replacement) tensor and,
    for a LoRA target, the factors. Stands where a safetensors file would in a TensorInfo."""

    def __init__(self, source: TensorInfo, lora: ModuleLora | None = None, part: str = "weight",
                 transposed: bool = False):
        self.source, self.lora, self.part, self.transposed = source, lora, part, transposed

    def load(self, info: TensorInfo):
        import torch

        dtype = torch_dtype(info.dtype)
        tensor = self.source.file.load(self.source)
        if self.lora is None:  # a whole tensor from the adapter (modules_to_save)
            return tensor.to(dtype)
        work = torch.promote_types(dtype, torch.float32)
        lora = self.lora
        if self.part == "bias":
            delta = lora.bias.file.load(lora.bias).to(work) * lora.scale
        else:
            delta = lora.B.file.load(lora.B).to(work) @ lora.A.file.load(lora.A).to(work)
            if lora.embedding or self.transposed:
                delta = delta.T
            delta = delta * lora.scale  # after the product, in PEFT's order: bitwise equal
        return (tensor.to(work) + delta).to(dtype)

    def release(self, info: TensorInfo) -> None:
        for part in (self.source, *((self.lora.A, self.lora.B, self.lora.bias) if self.lora else ())):
            if part is not None:
                part.file.release(part)


def _info(name: str, code: str, shape, file) -> TensorInfo:
    return TensorInfo(name, code, tuple(shape), file, 0, prod(shape) * ITEM_SIZE[code])


def _resize(base: Checkpoint, adapter: Adapter, where: str) -> int | None:
    """The vocabulary size when the adapter's whole tensors (modules_to_save) are larger than
    the base's embeddings, after checking every vocabulary-sized tensor is resized alike."""
    vocab = base.config.get("vocab_size")
    rows = {}
    for name, info in adapter.replacements.items():
        old = base.tensors.get(name)
        if old is None and name == head_name(base) and is_tied(base):
            if head_source(base) not in adapter.replacements:
                raise MixcliError(f"{where}: the adapter replaces the head '{name}' but the base model ties "
                                  "it to its input embeddings, which the adapter leaves as they are; "
                                  "untie the base model first")
            continue  # a tied head: it follows the saved embedding (PEFT's ensure_weight_tying)
        if old is None:
            raise MixcliError(f"{where}: adapter tensor '{name}' has no counterpart in the base model "
                              f"{base.path}; the adapter was made for another model")
        if info.shape == old.shape:
            continue
        if len(info.shape) == len(old.shape) == 2 and info.shape[1] == old.shape[1] and old.shape[0] == vocab:
            rows[name] = info.shape[0]
            continue
        raise MixcliError(f"{where}: adapter tensor '{name}' has shape {list(info.shape)} but the base "
                          f"model's is {list(old.shape)}; the adapter was made for another model")
    if not rows:
        return None
    sizes = sorted(set(rows.values()))
    if len(sizes) > 1:
        raise MixcliError(f"{where}: the adapter resizes the vocabulary to different sizes ({sizes})")
    for name, info in base.tensors.items():
        if name not in rows and len(info.shape) == 2 and info.shape[0] == vocab and info.floating:
            first = next(iter(rows))
            raise MixcliError(f"{where}: the adapter resizes '{first}' to {sizes[0]} rows but leaves "
                              f"'{name}' at {vocab}; it must save both (modules_to_save)")
    return sizes[0]


def apply_adapter(base: Checkpoint, adapter: Adapter, where: str) -> LoraCheckpoint:
    """``base`` with ``adapter`` applied lazily; every shape is checked here, before any read."""
    tensors = dict(base.tensors)
    config = dict(base.config)
    vocab = _resize(base, adapter, where)
    if vocab is not None:
        config["vocab_size"] = vocab
    for name, info in adapter.replacements.items():
        if name in base.tensors:  # not a tied head (see _resize)
            tensors[name] = _info(name, base.tensors[name].dtype, info.shape, _Applied(info))
    for module, lora in adapter.modules.items():
        name = f"{module}.weight"
        source = adapter.replacements.get(name) or base.tensors.get(name)
        if source is None:
            raise MixcliError(f"{where}: adapter module '{module}' has no tensor '{name}' in the base model "
                              f"{base.path}; the adapter was made for another model")
        out_features, in_features = lora.B.shape[0], lora.A.shape[1]
        flipped = lora.embedding or adapter.transposed
        shape = (in_features, out_features) if flipped else (out_features, in_features)
        if tuple(source.shape) != shape:
            hint = ("; the base stores it transposed (a Conv1D layer): set fan_in_fan_out = true in "
                    "adapter_config.json" if tuple(source.shape) == shape[::-1] and not lora.embedding else
                    "; the adapter was made for another model")
            raise MixcliError(f"{where}: adapter module '{module}' changes a {list(shape)} weight but "
                              f"'{name}' in the base model is {list(source.shape)}{hint}")
        code = base.tensors[name].dtype
        tensors[name] = _info(name, code, shape, _Applied(source, lora, "weight", adapter.transposed))
        if lora.bias is not None:
            bias = f"{module}.bias"
            source = adapter.replacements.get(bias) or base.tensors.get(bias)
            if source is None or tuple(source.shape) != (out_features,):
                raise MixcliError(f"{where}: adapter module '{module}' trains a bias (lora_bias) but the base "
                                  f"model has no {out_features}-element '{bias}'")
            tensors[bias] = _info(bias, base.tensors[bias].dtype, source.shape, _Applied(source, lora, "bias"))
    extra = dict(base.extra, lora=str(adapter.folder))
    return LoraCheckpoint(name=base.name, path=base.path, config=config, tensors=tensors, extra=extra,
                          adapter=adapter)


def load(ref) -> LoraCheckpoint:
    """The loader: open the base with whichever loader takes it, then read the adapter."""
    from mixcli.core import open_model
    from mixcli.default_plugins.pretrained import _folder
    from mixcli.plugins import get_registry

    if not getattr(ref, "lora", None):
        raise MixcliError(f"{ref.where}: loader 'lora' needs lora = \"<adapter folder>\"")
    where = f"{ref.where} lora"
    folder = _folder(dataclasses.replace(ref, path=ref.lora, revision=None, lora=None, where=where))
    adapter = read_adapter(folder, where)  # before the base: a bad adapter fails fast
    base = open_model(dataclasses.replace(ref, lora=None, loader=None), get_registry())
    return apply_adapter(base, adapter, where)
