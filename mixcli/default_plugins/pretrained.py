"""The built-in model loader: a save_pretrained folder, or a Hugging Face Hub id."""

from __future__ import annotations

import re
from pathlib import Path

from mixcli import ModelLoader, hookimpl
from mixcli.checkpoint import Checkpoint, open_safetensors, read_config
from mixcli.errors import MixcliError
from mixcli.safetensors_io import dtype_code

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.bin"]


def _folder(ref) -> Path:
    local = ref.resolved_path
    if local.exists():
        if not local.is_dir():
            raise MixcliError(f"{ref.where}: {local} is a file; give the model's folder")
        return local
    if not HUB_ID.match(ref.path):
        raise MixcliError(f"{ref.where}: path '{ref.path}' does not exist (looked at {local}); "
                          "fix the path or give a Hugging Face Hub id like 'org/model'")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(ref.path, revision=ref.revision, allow_patterns=HUB_PATTERNS))
    except Exception as error:  # offline, unknown repo, gated: all the user's to fix
        reason = (str(error).split(". ")[0] or type(error).__name__).strip().rstrip(".")
        raise MixcliError(f"{ref.where}: '{ref.path}' is neither a local folder (looked at {local}) nor "
                          f"available from the Hugging Face Hub ({reason}); fix the path, or download "
                          "the model first and give its local path") from None


class PickledFile:
    """A pytorch_model*.bin file, read only through torch's weights_only loader: memory-mapped
    when it is a zip archive (torch >= 1.6), read whole when it is the legacy format."""

    def __init__(self, path: Path):
        import zipfile

        import torch

        self.path = path
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
        except Exception as error:
            raise MixcliError(f"{path}: cannot be read as a weights-only PyTorch checkpoint "
                              f"({str(error).splitlines()[0]}); convert it to safetensors") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise MixcliError(f"{path}: holds no state dict of tensors (as save_pretrained writes); "
                              "convert it to safetensors")
        self.state = state

    def load(self, info):
        return self.state[info.name]

    def release(self, info) -> None:
        pass


def _pickled_tensors(folder: Path) -> dict:
    from mixcli.safetensors_io import TensorInfo

    tensors = {}
    for path in sorted(folder.glob("pytorch_model*.bin")):
        pickled = PickledFile(path)
        for name, value in pickled.state.items():
            if name in tensors:
                raise MixcliError(f"{path}: tensor '{name}' is also stored in {tensors[name].file.path.name}")
            nbytes = value.numel() * value.element_size()
            tensors[name] = TensorInfo(name, dtype_code(value.dtype), tuple(value.shape), pickled, 0, nbytes)
    return tensors


def load(ref) -> Checkpoint:
    if getattr(ref, "lora", None):  # never silently drop an adapter the user asked for
        raise MixcliError(f"{ref.where}: loader 'pretrained' cannot apply lora = '{ref.lora}'; "
                          "drop loader = \"pretrained\" (a LoRA plugin such as mixcli-lora applies it)")
    folder = _folder(ref)
    config = read_config(folder, ref.where)
    tensors = open_safetensors(folder, ref.where)
    if not tensors:
        tensors = _pickled_tensors(folder)
    if not tensors:
        raise MixcliError(f"{ref.where}: {folder} holds no *.safetensors or pytorch_model*.bin weights")
    return Checkpoint(name=ref.name, path=folder, config=config, tensors=tensors)


@hookimpl
def register_model_loaders(register):
    register(ModelLoader(
        name="pretrained",
        summary="a folder written by save_pretrained (safetensors, sharded or not; "
                "weights-only .bin), or a Hugging Face Hub id",
        accepts=lambda ref: not getattr(ref, "lora", None),
        load=load,
    ))
