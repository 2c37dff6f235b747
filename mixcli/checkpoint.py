"""A model on disk: its config and its tensors, readable one at a time."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .architecture import layer_count
from .errors import MixcliError
from .safetensors_io import SafetensorsFile, TensorInfo

# files copied from the donor model into a merge output, when present
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "chat_template.jinja", "preprocessor_config.json")


@dataclass
class Checkpoint:
    """A loaded model reference: config plus lazily readable tensors.

    ``tensors`` maps every tensor name to where it lives; :meth:`tensor` maps it into memory
    and :meth:`release` lets its pages go again.
    """

    name: str  # the name given in the project
    path: Path
    config: dict
    tensors: dict[str, TensorInfo]
    extra: dict = field(default_factory=dict)  # loader-specific details

    def tensor(self, name: str):
        info = self.tensors[name]
        return info.file.load(info)

    def release(self, name: str) -> None:
        info = self.tensors.get(name)
        if info is not None:
            info.file.release(info)

    @property
    def num_layers(self) -> int | None:
        return layer_count(self.config)

    def tokenizer_files(self) -> list[Path]:
        return [self.path / f for f in TOKENIZER_FILES if (self.path / f).is_file()]


def read_config(folder: Path, where: str) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise MixcliError(f"{where}: {folder} has no config.json; point it at a folder written by "
                          "save_pretrained")
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise MixcliError(f"{path}: cannot read the model config ({error})") from None
    if not isinstance(config, dict):
        raise MixcliError(f"{path}: the model config must be a JSON object")
    return config


def open_safetensors(folder: Path, where: str) -> dict[str, TensorInfo]:
    """Every tensor of a save_pretrained folder (single file or sharded with an index)."""
    index_path = folder / "model.safetensors.index.json"
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
            raise MixcliError(f"{index_path}: cannot read the shard index ({error}); "
                              "re-download or re-save the model") from None
        files: dict[str, SafetensorsFile] = {}
        tensors = {}
        if not isinstance(weight_map, dict):
            raise MixcliError(f"{index_path}: 'weight_map' must map tensor names to shard file names")
        for name, filename in weight_map.items():
            if not isinstance(filename, str) or filename not in files:
                shard = _shard_path(folder, index_path, name, filename)
                if not shard.is_file():
                    raise MixcliError(f"{index_path}: shard '{filename}' (holding '{name}') is missing")
                files[filename] = SafetensorsFile(shard)
            info = files[filename].tensors.get(name)
            if info is None:
                raise MixcliError(f"{index_path}: tensor '{name}' is listed in '{filename}' but not "
                                  "stored there; the index and shards disagree")
            tensors[name] = info
        return tensors
    # other safetensors files beside the weights (heads, data) are not part of the model
    shards = sorted(folder.glob("model*.safetensors")) or sorted(folder.glob("*.safetensors"))
    tensors = {}
    for shard in shards:
        for name, info in SafetensorsFile(shard).tensors.items():
            if name in tensors:
                raise MixcliError(f"{shard}: tensor '{name}' is also stored in "
                                  f"{tensors[name].file.path.name}")
            tensors[name] = info
    return tensors


def _shard_path(folder: Path, index_path: Path, name: str, filename) -> Path:
    """The shard ``filename`` names, which must lie inside ``folder``: judged on the name as
    written (Hub snapshots hold symbolic links into the cache, which are fine)."""
    if not isinstance(filename, str) or not filename:
        raise MixcliError(f"{index_path}: entry '{name}' names shard {filename!r}; shard names are "
                          "file names inside the model folder")
    normal = os.path.normpath(filename)
    if os.path.isabs(filename) or normal == ".." or normal.startswith(".." + os.sep):
        raise MixcliError(f"{index_path}: entry '{name}' names shard '{filename}', outside the model "
                          f"folder {folder}; mixcli reads only files inside it: fix the index")
    return folder / normal
