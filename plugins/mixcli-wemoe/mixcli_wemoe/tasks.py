"""Task folders: a classification head (``head.safetensors``: ``weight`` [labels, hidden],
``bias``) and ``task.json`` naming the data, relative to the folder. ``data`` is one file or a
table of splits (``{"train": ..., "test": ...}``). Data files are read with `datasets`
(json/jsonl/csv/parquet/arrow or a ``save_to_disk`` folder; columns ``pixel_values`` or
``input_ids``, and ``label``/``labels`` when present) or are safetensors files holding those
tensors. Labels are only ever used for monitoring and for PWE-MoE's supervised training.
``"feature"`` names what the head reads (:mod:`mixcli.features`: ``pooler_output``, ``cls``
or ``mean``; by default the pooler output where the backbone has a pooler, else ``cls``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mixcli import MixcliError
from mixcli.datafiles import load_rows
from mixcli.errors import first_line
from mixcli.features import head_features, task_feature


@dataclass
class Task:
    name: str  # the project model name of the expert
    title: str  # task name from task.json
    weight: object  # head [labels, hidden]
    bias: object
    inputs: dict  # model keyword arguments, each a tensor over all samples
    labels: object | None
    split: str
    data_path: str
    feature: str | None = None  # mixcli.features: None = the pooler output, else the first token

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def batch(self, index) -> dict:
        return {k: v[index] for k, v in self.inputs.items()}


def task_files(name: str, folder: Path, where: str) -> tuple[dict, Path]:
    if not (folder / "head.safetensors").is_file():
        raise MixcliError(f"{where}: task '{name}' has no head.safetensors in {folder}; each adapted task "
                          "needs its classification head")
    if not (folder / "task.json").is_file():
        raise MixcliError(f"{where}: task '{name}' has no task.json in {folder}; it names the task's data")
    try:
        info = json.loads((folder / "task.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise MixcliError(f"{where}: cannot read {folder / 'task.json'} ({error})") from None
    if not isinstance(info, dict):
        raise MixcliError(f"{where}: {folder / 'task.json'} must be a JSON object such as {{\"data\": \"test.jsonl\"}}")
    return info, folder / "head.safetensors"


def data_path(name: str, info: dict, folder: Path, split: str, where: str) -> Path:
    data = info.get("data")
    if isinstance(data, dict):
        if split not in data:
            raise MixcliError(f"{where}: task '{name}' has no '{split}' data in task.json "
                              f"(splits: {', '.join(data) or 'none'})")
        data = data[split]
    if not isinstance(data, str) or not data:
        raise MixcliError(f"{where}: task '{name}' has no data in task.json; add \"data\": \"file\"")
    path = folder / data
    if not path.exists():
        raise MixcliError(f"{where}: task '{name}': data file {path} does not exist")
    return path


def _safetensors(path: Path, name: str, where: str) -> dict:
    from safetensors.torch import load_file

    try:
        return dict(load_file(str(path)))
    except Exception as error:  # safetensors raises its SafetensorError (or OSError) on a bad file
        raise MixcliError(f"{where}: task '{name}': cannot read {path} as safetensors ({first_line(error)}); "
                          "re-save it with safetensors.torch.save_file") from None


def _columns(path: Path, name: str, where: str) -> dict:
    import torch

    if path.suffix == ".safetensors":
        return _safetensors(path, name, where)
    data = load_rows(path, where)
    out = {}
    try:
        for column in ("pixel_values", "input_ids", "attention_mask", "label", "labels"):
            if column in data.column_names:
                values = data[column]
                if column == "input_ids":  # pad ragged token lists, with a mask
                    width = max(len(v) for v in values)
                    out["input_ids"] = torch.tensor([list(v) + [0] * (width - len(v)) for v in values])
                    out["attention_mask"] = torch.tensor([[1] * len(v) + [0] * (width - len(v)) for v in values])
                elif column != "attention_mask" or "input_ids" not in out:
                    out[column] = torch.tensor(values)
    except (TypeError, ValueError, RuntimeError) as error:  # ragged or non-numeric values
        raise MixcliError(f"{where}: task '{name}': {path} column '{column}' is not numeric and rectangular "
                          f"({first_line(error)})") from None
    return out


def _check(name: str, path: Path, head_path: Path, head: dict, inputs: dict, labels, config: dict,
           where: str) -> None:
    """What the model and head will need of the data, checked before any training step."""
    where = f"{where}: task '{name}'"
    weight, bias = head["weight"], head["bias"]
    if weight.dim() != 2 or bias.shape != (weight.shape[0],):
        raise MixcliError(f"{where}: {head_path} must hold 'weight' [labels, features] and 'bias' [labels], got "
                          f"{list(weight.shape)} and {list(bias.shape)}")
    hidden = config.get("hidden_size")
    if isinstance(hidden, int) and weight.shape[1] != hidden:
        raise MixcliError(f"{where}: the head in {head_path} reads {weight.shape[1]} features; the backbone gives "
                          f"{hidden} (hidden_size)")
    count = len(next(iter(inputs.values())))
    if count == 0:
        raise MixcliError(f"{where}: {path} holds no samples")
    if "pixel_values" in inputs:
        size, channels = config.get("image_size", 0), config.get("num_channels", 1)
        shape = tuple(inputs["pixel_values"].shape[1:])
        if isinstance(size, int) and size and isinstance(channels, int) and shape != (channels, size, size):
            raise MixcliError(f"{where}: {path} has pixel_values of shape {list(shape)} per sample; the backbone "
                              f"takes [{channels}, {size}, {size}]")
    else:
        vocab = config.get("vocab_size")
        ids = inputs["input_ids"]
        if isinstance(vocab, int) and ids.numel() and not 0 <= int(ids.min()) <= int(ids.max()) < vocab:
            raise MixcliError(f"{where}: {path} has input_ids outside the backbone's vocabulary 0..{vocab - 1}")
    if labels is not None:
        if len(labels) != count:
            raise MixcliError(f"{where}: {path} has {len(labels)} labels for {count} samples")
        if labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) < weight.shape[0]:
            raise MixcliError(f"{where}: {path} has labels outside 0..{weight.shape[0] - 1}, the classes of its "
                              f"head {head_path}")


def read_task(name: str, folder: Path, split: str, config: dict, where: str, max_samples: int = 0) -> Task:
    """The task of the expert ``name`` stored in ``folder``."""
    import torch

    info, head_path = task_files(name, Path(folder), where)
    feature = task_feature(info, Path(folder) / "task.json", f"{where}: task '{name}'")
    path = data_path(name, info, Path(folder), split, where)
    columns = _columns(path, name, where)
    head = _safetensors(head_path, name, where)
    if "weight" not in head or "bias" not in head:
        raise MixcliError(f"{where}: task '{name}': {head_path} must hold 'weight' and 'bias'")
    labels = columns.get("label", columns.get("labels"))
    if "pixel_values" in columns:
        x = columns["pixel_values"].float()
        size, channels = config.get("image_size", 0), config.get("num_channels", 1)
        if isinstance(size, int) and size and x.dim() and len(x) and x[0].numel() == channels * size * size:
            x = x.reshape(len(x), channels, size, size)
        inputs = {"pixel_values": x}
    elif "input_ids" in columns:
        ids = columns["input_ids"].long()
        inputs = {"input_ids": ids, "attention_mask": columns.get("attention_mask", torch.ones_like(ids)).long()}
    else:
        raise MixcliError(f"{where}: task '{name}': {path} has neither 'pixel_values' nor 'input_ids'")
    if max_samples:
        inputs = {k: v[:max_samples] for k, v in inputs.items()}
        labels = None if labels is None else labels[:max_samples]
    labels = None if labels is None else torch.as_tensor(labels).long().reshape(-1)
    _check(name, path, head_path, head, inputs, labels, config, where)
    return Task(name, str(info.get("task", name)), head["weight"].float(), head["bias"].float(), inputs,
                labels, split, str(path), feature)


def logits(model, task: Task, batch: dict, device) -> object:
    batch = {k: v.to(device) for k, v in batch.items()}
    out = model(**batch)
    f = head_features(out, task.feature, batch.get("attention_mask"), f"task '{task.name}'").float()
    return f @ task.weight.to(device).T + task.bias.to(device)
