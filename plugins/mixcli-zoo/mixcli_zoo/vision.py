"""Vision family: a tiny ViT on scikit-learn's 8x8 digits and task experts from it.

Recipe, modelled on CLIP fine-tuning (a broad base, fixed zero-shot heads):
1. the base is pretrained on upright digits with light augmentation (+-1 px shifts,
   mild noise) through a digit head;
2. every task is digit recognition under one corruption (half the image occluded, strong
   noise, a checkerboard mask), read through the base's own digit head, kept FROZEN,
   as CLIP's text-derived heads are: the base is poor on the corrupted inputs, and every
   row of a merge table reads the same heads;
3. each expert fine-tunes the backbone with a small learning rate, patch and position
   embeddings frozen (the input geometry all tasks share).
Why these choices: geometric tasks (rotations, flips, permutations) and per-task probe
heads both made every merge fall to or below the base at this size, whatever the width;
corruptions of one domain keep the task vectors partly complementary, and a 128-wide
model stays close enough to linear that task arithmetic beats plain averaging.
The feature a head reads is the pooler output (dense+tanh over [CLS]).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from .training import seed_everything, train_loop, write_json

VERSION = "vision-3"  # 3: validation split carved out of the held-out part
SPLITS = ("train", "test", "validation")  # the index seeds each split's noise


# ---------------------------------------------------------------- data and tasks
def load_digits_split(seed: int, test_frac: float = 0.3, validation_share: float = 0.5):
    """Digits as float images in [0, 1], shape [N, 1, 8, 8]: seeded, stratified, disjoint
    train, validation and test parts, as ``(x, y)`` pairs.

    ``test_frac`` of each class is held out from training; ``validation_share`` of that
    held-out part (per class) is the validation split, the rest the test split. The data set
    is finite, so the validation split is carved out of the held-out part: the training part
    (and so every trained model) is the same as with no validation split at all.
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    rng = np.random.default_rng(seed)
    part = np.zeros(len(y), dtype=np.int64)  # 0 train, 1 validation, 2 test
    for c in range(10):
        idx = np.flatnonzero(d.target == c)
        rng.shuffle(idx)
        held = idx[: int(round(len(idx) * test_frac))]
        n_val = int(round(len(held) * validation_share))
        part[held[:n_val]] = 1
        part[held[n_val:]] = 2
    masks = [torch.tensor(part == k) for k in range(3)]
    return tuple((x[m], y[m]) for m in masks)


def _noise_fn(seed: int, std: float) -> Callable:
    def f(x, split="test"):
        # fixed noise per split so the held-out sets are stable files
        g = torch.Generator().manual_seed(2000 + seed + SPLITS.index(split))
        return (x + std * torch.randn(x.shape, generator=g)).clamp(0, 1)

    return f


@dataclass(frozen=True)
class Task:
    name: str
    num_labels: int
    transform: Callable  # images -> images
    split_aware: bool = False  # transform takes split= (random noise)


def _occlude(rows: slice, cols: slice) -> Callable:
    def f(x):
        out = x.clone()
        out[:, :, rows, cols] = 0
        return out

    return f


def _checker(x):
    keep = ((torch.arange(8)[:, None] + torch.arange(8)[None]) % 2 == 0).to(x.dtype)
    return x * keep


def make_tasks(seed: int, names=None) -> dict[str, Task]:
    half, rest, all_ = slice(0, 4), slice(4, 8), slice(None)
    tasks = [
        Task("occlude_top", 10, _occlude(half, all_)),
        Task("occlude_bottom", 10, _occlude(rest, all_)),
        Task("occlude_left", 10, _occlude(all_, half)),
        Task("occlude_right", 10, _occlude(all_, rest)),
        Task("noise", 10, _noise_fn(seed, 0.5), split_aware=True),
        Task("checker", 10, _checker),
    ]
    out = {t.name: t for t in tasks}
    if names is not None:
        out = {n: out[n] for n in names}
    return out


def apply_task(task: Task, x, y, split: str):
    xt = task.transform(x, split=split) if task.split_aware else task.transform(x)
    return xt.contiguous(), y


def pretrain_augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random +-1 pixel shifts and mild noise: general features without the task transforms."""
    n = x.shape[0]
    out = torch.empty_like(x)
    shifts = torch.randint(-1, 2, (n, 2), generator=gen)
    for s0 in (-1, 0, 1):
        for s1 in (-1, 0, 1):
            m = (shifts[:, 0] == s0) & (shifts[:, 1] == s1)
            if m.any():
                out[m] = torch.roll(x[m], (s0, s1), (2, 3))
    out = out + 0.1 * torch.randn(out.shape, generator=gen)
    return out.clamp(0, 1)


# ---------------------------------------------------------------- model
TASKS = ("occlude_top", "occlude_bottom", "occlude_left", "occlude_right", "noise", "checker")
SIZES = {
    # freeze: parameter-name prefixes kept fixed while fine-tuning experts (embeddings
    # hold the patch/position geometry every task shares; changing them wrecks merges)
    "full": dict(hidden=128, layers=4, heads=4, mlp=512, batch=128, pre_steps=800, pre_lr=2e-3,
                 ft_steps=150, ft_batch=64, ft_lr=1e-4, freeze=("embeddings.",), tasks=TASKS),
    # quick (`mixcli demo`, the README's first command): half as wide, half as deep, fewer steps
    "quick": dict(hidden=64, layers=2, heads=2, mlp=256, batch=128, pre_steps=400, pre_lr=3e-3,
                  ft_steps=100, ft_batch=64, ft_lr=3e-4, freeze=("embeddings.",), tasks=TASKS),
    # tiny only has to show experts beating the base, so experts train harder there
    "tiny": dict(hidden=32, layers=2, heads=2, mlp=64, batch=128, pre_steps=250, pre_lr=5e-3,
                 ft_steps=100, ft_batch=64, ft_lr=2e-3, freeze=(), tasks=TASKS),
}


def make_config(hp: dict):
    from transformers import ViTConfig

    return ViTConfig(
        image_size=8, patch_size=2, num_channels=1,
        hidden_size=hp["hidden"], num_hidden_layers=hp["layers"],
        num_attention_heads=hp["heads"], intermediate_size=hp["mlp"],
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        qkv_bias=True,
    )


def features(model, x: torch.Tensor) -> torch.Tensor:
    return model(pixel_values=x).pooler_output




# ---------------------------------------------------------------- build
def _save_tensors(path: Path, **tensors) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


def _save_member(folder: Path, model, head_w, head_b, task: str, num_labels: int, data_rel: dict):
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    _save_tensors(folder / "head.safetensors", weight=head_w.detach().clone(), bias=head_b.detach().clone())
    # data paths are relative to the folder holding task.json
    write_json(folder / "task.json", {
        "task": task, "num_labels": num_labels, "feature": "pooler_output", "data": data_rel,
    })


def build_vision(out: Path, size: str, seed: int, log=print) -> dict:
    """Train and write the vision family under ``out``; return its manifest."""
    from transformers import ViTModel

    hp = SIZES[size]
    t_start = time.time()
    gen = seed_everything(seed)
    (xtr, ytr), (xva, yva), (xte, yte) = load_digits_split(seed)
    tasks = make_tasks(seed, hp["tasks"])

    # data files: one per task and split, plus the base's own (plain digits)
    data = {}
    for name, task in [("digits", None)] + list(tasks.items()):
        files = {}
        for split, (x, y) in (("train", (xtr, ytr)), ("validation", (xva, yva)), ("test", (xte, yte))):
            xs, ys = (x, y) if task is None else apply_task(task, x, y, split)
            rel = f"data/{name}/{split}.safetensors"
            _save_tensors(out / rel, pixel_values=xs, labels=ys)
            files[split] = (xs, ys, rel)
        data[name] = files

    def rel_from(folder: str, name: str) -> dict:
        up = "../" * (folder.count("/") + 1)  # from the member folder back to the family root
        return {s: up + data[name][s][2] for s in SPLITS}

    # 1. base
    model = ViTModel(make_config(hp))
    model.config._attn_implementation = "eager"  # faster than sdpa at this size on CPU
    head = torch.nn.Linear(hp["hidden"], 10)
    params = list(model.parameters()) + list(head.parameters())
    model.train()

    def pre_loss(idx):
        return F.cross_entropy(head(features(model, pretrain_augment(xtr[idx], gen))), ytr[idx])

    train_loop(params, pre_loss, len(ytr), steps=hp["pre_steps"], batch_size=hp["batch"],
               lr=hp["pre_lr"], gen=gen, weight_decay=0.05, warmup=min(50, hp["pre_steps"] // 5),
               label="vision: pretraining the base")
    model.eval()
    _save_member(out / "base", model, head.weight, head.bias, "digits", 10, rel_from("base", "digits"))
    base_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    log(f"  vision base trained ({time.time() - t_start:.0f}s)")

    experts = {}
    for name, task in tasks.items():
        xtr_t, ytr_t, _ = data[name]["train"]
        model.load_state_dict(base_sd)
        # 2. the task's head is the base's digit head, frozen (a "zero-shot" head)
        h = torch.nn.Linear(hp["hidden"], task.num_labels)
        h.load_state_dict(head.state_dict())
        h.requires_grad_(False)
        # 3. fine-tune the backbone against the frozen head
        trainable = [p for n, p in model.named_parameters() if not n.startswith(hp["freeze"])]
        for n, p in model.named_parameters():
            p.requires_grad_(not n.startswith(hp["freeze"]))
        model.train()
        train_loop(trainable, lambda idx: F.cross_entropy(h(features(model, xtr_t[idx])), ytr_t[idx]),
                   len(ytr_t), steps=hp["ft_steps"], batch_size=hp["ft_batch"], lr=hp["ft_lr"], gen=gen, warmup=10,
                   label=f"vision: expert {name}")
        for p in model.parameters():
            p.requires_grad_(True)
        model.eval()
        folder = f"experts/{name}"
        _save_member(out / folder, model, h.weight, h.bias, name, task.num_labels, rel_from(folder, name))
        experts[name] = folder
    log(f"  vision experts trained ({time.time() - t_start:.0f}s)")

    return {
        "family": "vision",
        "architecture": "ViTModel",
        "feature": "pooler_output",
        "base": "base",
        "experts": [{"task": n, "path": p, "num_labels": tasks[n].num_labels} for n, p in experts.items()],
        "data": {n: {s: data[n][s][2] for s in SPLITS} for n in data},
        "hyperparameters": {k: (list(v) if isinstance(v, tuple) else v) for k, v in hp.items()},
    }
