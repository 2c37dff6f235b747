"""Shared helpers: seeding, minibatches and the zoo's training loop (on mixcli.training), manifests."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a torch generator for data order."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def set_threads(n: int = 2) -> None:
    # Same thread count every build keeps CPU reductions (and thus weights) reproducible.
    torch.set_num_threads(n)


def batches(n: int, batch_size: int, steps: int, gen: torch.Generator) -> Iterable[torch.Tensor]:
    """``steps`` index batches drawn epoch by epoch from a seeded permutation."""
    done = 0
    while done < steps:
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size):
            yield perm[i : i + batch_size]
            done += 1
            if done >= steps:
                return


def train_loop(
    params: list[torch.nn.Parameter],
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    n: int,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    gen: torch.Generator,
    weight_decay: float = 0.0,
    warmup: int = 0,
    label: str = "training",
) -> float:
    """AdamW with linear warmup and cosine decay (mixcli's training runtime), shown as a progress
    bar named ``label``; returns the last loss."""
    from mixcli.training import Schedule, Step, train_steps

    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    order = iter(batches(n, batch_size, steps, gen))

    def step(_):
        loss = loss_fn(next(order))
        return Step(loss, {"loss": loss.item()})

    record = train_steps(step, params, opt, steps, schedule=Schedule("cosine", warmup_steps=warmup),
                         grad_clip=1.0, label=label)
    return record.last.get("loss", float("nan"))


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def read_json(path: Path):
    return json.loads(Path(path).read_text())
