"""A PEFT LoRA adapter folder read without PEFT: its config checked, its tensors grouped by the
module they change, and each module's scale resolved as PEFT does. Reads headers only."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from mixcli.errors import MixcliError

CONFIG = "adapter_config.json"
WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PREFIX = "base_model.model."
# adapter tensor suffix -> (role, name of the base tensor it changes, relative to the module)
PARTS = {".lora_A.weight": ("A", "weight"), ".lora_B.weight": ("B", "weight"),
         ".lora_B.bias": ("bias", "bias"), ".lora_embedding_A": ("A", "weight"),
         ".lora_embedding_B": ("B", "weight")}
# LoraConfig fields naming a variant whose merged weights are not W + s·B@A (or not a module's
# weight at all); set to anything but their default, they are refused
UNSUPPORTED = {"use_dora": "DoRA", "use_qalora": "QA-LoRA", "alora_invocation_tokens": "activated LoRA",
               "trainable_token_indices": "trainable tokens", "target_parameters": "LoRA on parameters",
               "layer_replication": "layer replication", "use_bdlora": "BD-LoRA",
               "arrow_config": "Arrow routing", "kasa_config": "KaSA", "velora_config": "VeLoRA",
               "monteclora_config": "MonteCLoRA"}
# the infixes under which PEFT saves whole tensors, least authoritative first: the merged
# model holds the trained copy (modules_to_save, or the plain name) over the original
WHOLE = (".original_module.", ".base_layer.", ".modules_to_save.")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")


def pattern_key(patterns, module: str) -> str | None:
    """The first key of a rank_pattern / alpha_pattern that names ``module``, PEFT's way: the
    key is a regex matching the end of the module name at a dot boundary."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


@dataclass
class ModuleLora:
    """The LoRA factors of one module: ``delta = s·B@A`` (transposed for embeddings and
    fan_in_fan_out layers), plus ``lora_B.bias`` when the adapter trains biases."""

    module: str
    A: object = None  # TensorInfo
    B: object = None
    bias: object = None
    embedding: bool = False
    scale: float = 1.0
    rank: int = 0


@dataclass
class Adapter:
    folder: Path
    where: str
    config: dict
    modules: dict[str, ModuleLora] = field(default_factory=dict)  # by module name
    replacements: dict[str, object] = field(default_factory=dict)  # base tensor name -> TensorInfo
    transposed: bool = False  # fan_in_fan_out: the base stores these weights as [in, out]

    def tokenizer_files(self) -> list[Path]:
        return [self.folder / f for f in TOKENIZER_FILES if (self.folder / f).is_file()]


def read_config(folder: Path, where: str) -> dict:
    path = folder / CONFIG
    if not path.is_file():
        raise MixcliError(f"{where}: {folder} has no {CONFIG}; give a folder written by PEFT's save_pretrained")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise MixcliError(f"{path}: cannot read the adapter config ({error})") from None
    if not isinstance(config, dict):
        raise MixcliError(f"{path}: the adapter config must be a JSON object")
    kind = config.get("peft_type")
    if kind != "LORA":
        raise MixcliError(f"{path}: peft_type {kind!r} is not supported; mixcli applies LoRA adapters "
                          "(peft_type \"LORA\") only: merge this one with PEFT's merge_and_unload first")
    for key, what in UNSUPPORTED.items():
        if config.get(key) not in (None, False, [], {}):
            raise MixcliError(f"{path}: {key} = {json.dumps(config[key])} ({what}) is not supported; mixcli "
                              "applies plain LoRA only: merge this adapter with PEFT's merge_and_unload first")
    for key in ("r", "lora_alpha"):
        value = config.get(key, 8)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise MixcliError(f"{path}: {key} must be a positive number, got {value!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(key) or {}, dict):
            raise MixcliError(f"{path}: {key} must be an object mapping module names to numbers")
    return config


def _open_weights(folder: Path, where: str) -> dict:
    from mixcli.safetensors_io import SafetensorsFile

    path = folder / WEIGHTS[0]
    if path.is_file():
        return SafetensorsFile(path).tensors
    if (folder / WEIGHTS[1]).is_file():
        from mixcli.default_plugins.pretrained import PickledFile
        from mixcli.safetensors_io import TensorInfo, dtype_code

        pickled = PickledFile(folder / WEIGHTS[1])
        return {name: TensorInfo(name, dtype_code(value.dtype), tuple(value.shape), pickled, 0,
                                 value.numel() * value.element_size())
                for name, value in pickled.state.items()}
    raise MixcliError(f"{where}: {folder} has no {WEIGHTS[0]} or {WEIGHTS[1]}; give a folder written by "
                      "PEFT's save_pretrained")


def read_adapter(folder: Path, where: str) -> Adapter:
    """Check the adapter's config and group its tensors by module; reads no tensor data."""
    config = read_config(folder, where)
    adapter = Adapter(folder, where, config, transposed=bool(config.get("fan_in_fan_out")))
    weights_path = folder / WEIGHTS[0]
    ranks: dict[str, int] = {}
    for name, info in _open_weights(folder, where).items():
        if not name.startswith(PREFIX):
            raise MixcliError(f"{weights_path}: tensor '{name}' lacks PEFT's '{PREFIX}' prefix; "
                              "this is not an adapter saved by PEFT")
        name = name[len(PREFIX):]
        if name.endswith(".lora_magnitude_vector") or ".lora_magnitude_vector." in name:
            raise MixcliError(f"{weights_path}: tensor '{name}' is a DoRA magnitude (use_dora); DoRA is not "
                              "supported: merge this adapter with PEFT's merge_and_unload first")
        suffix = next((s for s in PARTS if name.endswith(s)), None)
        if suffix is None:
            # whole tensors: modules_to_save (saved plain, and under the wrapper's names when
            # the vocabulary was resized) and the saved base of a resized embedding LoRA
            rank = next((r for r, part in enumerate(WHOLE) if part in name), len(WHOLE))
            plain = name.replace(WHOLE[rank], ".") if rank < len(WHOLE) else name
            if rank >= ranks.get(plain, -1):
                adapter.replacements[plain], ranks[plain] = info, rank
            continue
        module = name[: -len(suffix)]
        role, _ = PARTS[suffix]
        lora = adapter.modules.setdefault(module, ModuleLora(module))
        setattr(lora, role, info)
        lora.embedding = lora.embedding or "embedding" in suffix
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    for module, lora in adapter.modules.items():
        if lora.A is None or lora.B is None:
            missing = "A" if lora.A is None else "B"
            raise MixcliError(f"{weights_path}: module '{module}' has no lora_{missing} tensor; the adapter "
                              "file is incomplete: re-save it")
        key = pattern_key(rank_pattern, module)
        rank = rank_pattern[key] if key is not None else config.get("r", 8)
        key = pattern_key(alpha_pattern, module)
        alpha = alpha_pattern[key] if key is not None else config.get("lora_alpha", 8)
        a_rank, b_rank = lora.A.shape[0], lora.B.shape[-1]
        if len(lora.A.shape) != 2 or len(lora.B.shape) != 2 or a_rank != rank or b_rank != rank:
            raise MixcliError(f"{weights_path}: module '{module}' has rank {a_rank} (lora_A) and {b_rank} "
                              f"(lora_B) but {CONFIG} gives r = {rank} (r / rank_pattern); the config "
                              "and the weights disagree")
        lora.rank = rank
        lora.scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return adapter
