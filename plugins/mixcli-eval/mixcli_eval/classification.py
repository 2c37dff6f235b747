"""Per-task classification accuracy of one shared backbone with each task's own head.

The setting of the task-arithmetic, TIES and WE-MoE papers: the backbone is merged, every
task keeps the classification head of its expert. A task is a folder (usually the expert
itself) holding ``head.safetensors`` (``weight`` [labels, hidden], ``bias``) and
``task.json`` (``{"task": name, "data": file}`` or ``{"data": {"test": file, "validation": file,
...}}``, paths relative to the folder; ``split`` picks the entry, "test" by default); the data
has a ``pixel_values`` column (flat or shaped) and a ``label`` (or ``labels``) column;
``"feature"`` names what the head reads (:mod:`mixcli.features`: ``pooler_output``, ``cls`` or
``mean``; by default the pooler output where the backbone has a pooler, else the first token).
Every model compared on a task, the base included, is read through that same head. A backbone
saved without its pooler (``add_pooling_layer=False``) is loaded without one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mixcli import Evaluator, MixcliError, param
from mixcli.features import task_feature


@dataclass
class Params:
    tasks: list = param([], help="task folders or project model names with head.safetensors + task.json "
                                 "(default: every project model that has them)")
    split: str = param("test", help="which entry of task.json's data table to measure (\"validation\" to "
                                    "choose coefficients, \"test\" to report)")
    max_samples: int = param(0, help="evaluate at most this many images per task (0 = all)", min=0)
    batch_size: int = param(256, help="images per forward pass", min=1)


def task_folders(context) -> list[Path]:
    names = context.params["tasks"]
    if not names:
        folders = [p for p in context.models.values() if (p / "task.json").is_file()]
        if not folders:
            raise MixcliError("classification: no project model has a task.json and head.safetensors; "
                              "list the task folders in tasks = [...]")
        return folders
    folders = []
    for name in names:
        folder = context.models.get(name) or context.path(name)
        if not (folder / "task.json").is_file() or not (folder / "head.safetensors").is_file():
            raise MixcliError(f"classification: task '{name}' ({folder}) needs task.json and head.safetensors")
        folders.append(folder)
    return folders


def read_task(folder: Path, max_samples: int, split: str = "test"):
    """(name, head weight, head bias, images, labels, feature) of the ``split`` data of the task
    stored in ``folder``."""
    import torch
    from safetensors.torch import load_file

    from mixcli.datafiles import column, load_rows

    try:
        info = json.loads((folder / "task.json").read_text())
    except (OSError, ValueError) as error:
        raise MixcliError(f"classification: {folder / 'task.json'} cannot be read as JSON ({error})") from None
    if not isinstance(info, dict):
        raise MixcliError(f"classification: {folder / 'task.json'} must hold a JSON object")
    where = f"classification: task '{info.get('task', folder.name)}'"
    feature = task_feature(info, folder / "task.json", where)
    try:
        head = load_file(folder / "head.safetensors")
    except Exception as error:  # safetensors raises its own error type for a damaged file
        raise MixcliError(f"{where}: {folder / 'head.safetensors'} cannot be read ({error})") from None
    if "weight" not in head or "bias" not in head:
        raise MixcliError(f"{where}: {folder / 'head.safetensors'} must hold 'weight' [labels, hidden] and "
                          f"'bias' [labels], got {sorted(head)}")
    data = info.get("data")
    if isinstance(data, dict):
        if split not in data:
            raise MixcliError(f"{where}: {folder / 'task.json'} has no '{split}' data "
                              f"(splits: {', '.join(map(str, data)) or 'none'}); set split to one of them")
        data = data[split]
    elif split != "test" and isinstance(data, str):
        raise MixcliError(f"{where}: {folder / 'task.json'} names one data file, read as the test split; "
                          f"for split = \"{split}\" give \"data\" as a table {{\"{split}\": file, ...}}")
    if not isinstance(data, str):
        raise MixcliError(f"{where}: {folder / 'task.json'} names no {split} data (\"data\": file or {{\"{split}\": file}})")
    path = folder / data
    rows = load_rows(path, where, max_samples)
    label = "label" if "label" in rows.column_names else "labels"
    for name in ("pixel_values", label):
        column(rows, name, where, path)  # a clear error for a missing column
    batch = rows.with_format("torch")[:]
    images = batch["pixel_values"].to(torch.float32)
    labels = batch[label].to(torch.long)
    return info.get("task", folder.name), head["weight"], head["bias"], images, labels, feature


def evaluate(context) -> dict:
    from mixcli_eval.metrics import classification_accuracy

    p = context.params
    tasks = [read_task(folder, p["max_samples"], p["split"]) for folder in task_folders(context)]
    backbone = context.load_model("AutoModel")  # without a pooler where it was saved without one
    config = backbone.config
    shape = (getattr(config, "num_channels", 1), getattr(config, "image_size", 8), getattr(config, "image_size", 8))
    scores = {}
    with context.progress(sum(len(task[4]) for task in tasks), "images") as bar:
        for name, weight, bias, images, labels, feature in tasks:
            hidden = getattr(config, "hidden_size", weight.shape[-1])
            if weight.dim() != 2 or weight.shape[1] != hidden or bias.shape != weight.shape[:1]:
                raise MixcliError(f"classification: task '{name}': head weight {list(weight.shape)} and bias "
                                  f"{list(bias.shape)} do not fit the model's hidden size {hidden}")
            if len(images) and images[0].numel() != shape[0] * shape[1] * shape[2]:
                raise MixcliError(f"classification: task '{name}': images have {images[0].numel()} values, the "
                                  f"model takes {shape[0]}x{shape[1]}x{shape[2]}")
            images = images.reshape(len(images), *shape)
            scores[name] = classification_accuracy(backbone, weight, bias, images, labels, batch_size=p["batch_size"],
                                                   advance=bar.advance, feature=feature,
                                                   where=f"classification: task '{name}'")
    scores["mean"] = sum(scores.values()) / len(scores)
    return scores


EVALUATOR = Evaluator(name="classification", summary="accuracy per task, each with its expert's head, and the mean",
                      evaluate=evaluate, params=Params, metrics={"mean": "higher", "*": "higher"})
