"""One training runtime for every command that trains: ``mixcli tune``, ``mixcli adapt`` and
``[adapt]`` (WE-MoE test-time adaptation, PWE-MoE training) and the zoo's builds.

- :func:`distributed`: the process group from torchrun's environment (``WORLD_SIZE``, ``RANK``,
  ``LOCAL_RANK``): gloo on CPU, nccl on CUDA, nothing at all for one process;
- :class:`Schedule` and :func:`scheduler`: the learning rate over the steps, with
  transformers' names (``lr_scheduler_type`` ``constant`` / ``linear`` / ``cosine``,
  ``warmup_steps`` or ``warmup_ratio``, and ``min_lr_rate`` as in its
  ``cosine_with_min_lr``), read from a TOML table by :func:`read_schedule`;
- :func:`train_steps`: the loop (zero the gradients, the caller's step, gradients averaged
  over the processes, clipping, optimizer and schedule steps) with a progress bar
  (:mod:`mixcli.progress`), returning a :class:`LossRecord`;
- :func:`loss_curve`: the loss-curve PNG written beside a trained model.

Importing this module does not import torch.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

from .errors import MixcliError

SCHEDULER_TYPES = ("constant", "linear", "cosine")


# -- the processes ----------------------------------------------------------------------------

@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Whether this process writes outputs and logs (rank 0)."""
        return self.rank == 0

    def share(self, batch_size: int, where: str) -> slice:
        """This process's slice of a global batch of ``batch_size``, which must split evenly."""
        if batch_size % self.size:
            raise MixcliError(f"{where}: batch_size {batch_size} is not divisible by the {self.size} processes; "
                              f"set it to a multiple of {self.size}")
        per = batch_size // self.size
        return slice(self.rank * per, (self.rank + 1) * per)


def current_world() -> World:
    """The initialised process group's world; one process without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return World()


@contextmanager
def distributed(device: str = "cpu"):
    """The training processes torchrun started (``WORLD_SIZE`` > 1): joins the process group
    (nccl when ``device`` is CUDA, else gloo), selects this process's GPU, and on CPU gives
    each process its share of the cores; yields the :class:`World`. One process: nothing is
    set up. On a clean exit the processes wait for each other before leaving the group."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        yield current_world()
        return
    import torch
    import torch.distributed as dist

    cuda = str(device).startswith("cuda")
    joined = not dist.is_initialized()
    if joined:
        dist.init_process_group("nccl" if cuda else "gloo")
    world = current_world()
    if cuda:
        torch.cuda.set_device(world.local_rank)
    else:  # N processes each using every core would only fight over them
        torch.set_num_threads(max(1, torch.get_num_threads() // world.size))
    try:
        yield world
        dist.barrier()
    finally:
        if joined:
            dist.destroy_process_group()


def all_reduce(tensor, mean: bool = False):
    """``tensor`` summed (or averaged) over the processes; unchanged for one process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        if mean:
            tensor /= dist.get_world_size()
    return tensor


def average_gradients(params) -> None:
    """Each parameter's gradient averaged over the processes (a missing one counts as zero)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad /= dist.get_world_size()


# -- the learning-rate schedule ----------------------------------------------------------------

@dataclass
class Schedule:
    """The learning rate over ``total`` steps, as a multiple of the optimizer's ``lr``.

    Warm-up rises linearly over the first ``warmup_steps`` steps (``warmup_ratio`` of the steps
    when ``warmup_steps`` is 0): step ``s`` uses ``(s + 1) / warmup`` of ``lr``, so the last
    warm-up step reaches ``lr`` and no step is spent at 0 (transformers starts at 0). Then
    ``constant`` stays at ``lr``; ``linear`` and ``cosine`` decay from ``lr`` to
    ``min_lr_rate * lr`` one step after the last (transformers' schedules end there too), linearly
    or along half a cosine.
    """

    lr_scheduler_type: str = "constant"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    min_lr_rate: float = 0.0

    def warmup(self, total: int) -> int:
        """Warm-up steps out of ``total``."""
        if self.warmup_steps:
            return self.warmup_steps
        return math.ceil(self.warmup_ratio * total)

    def factor(self, step: int, total: int) -> float:
        """The multiple of ``lr`` used by step ``step`` (0-based) of ``total``."""
        warmup = self.warmup(total)
        if step < warmup:
            return (step + 1) / warmup
        if self.lr_scheduler_type == "constant":
            return 1.0
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        if self.lr_scheduler_type == "linear":
            decay = 1.0 - progress
        else:
            decay = 0.5 * (1 + math.cos(math.pi * progress))
        if not self.min_lr_rate:
            return decay
        return self.min_lr_rate + (1 - self.min_lr_rate) * decay


# key -> (type, help); every table that trains accepts these, the README lists the same
SCHEDULE_KEYS = {
    "lr_scheduler_type": (str, "learning-rate schedule: 'constant', 'linear' or 'cosine' (decay to "
                               "min_lr_rate·lr one step after the last, as transformers)"),
    "warmup_steps": (int, "steps of linear warm-up to lr (0: none, or warmup_ratio)"),
    "warmup_ratio": (float, "warm-up as a share of the steps, used when warmup_steps is 0"),
    "min_lr_rate": (float, "where linear and cosine decay end, as a multiple of lr"),
}


def read_schedule(table: dict, where: str, defaults: Schedule | None = None) -> Schedule:
    """The schedule keys of ``table`` (others are ignored) over ``defaults``; a one-line error
    naming ``where`` and the key for a wrong type or value."""
    values = dict((defaults or Schedule()).__dict__)
    for key, (kind, _) in SCHEDULE_KEYS.items():
        if key not in table:
            continue
        value = table[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise MixcliError(f"{where}: '{key}' must be a {kind.__name__}, got {value!r}")
        values[key] = value
    schedule = Schedule(**values)
    if schedule.lr_scheduler_type not in SCHEDULER_TYPES:
        raise MixcliError(f"{where}: 'lr_scheduler_type' must be " + ", ".join(repr(t) for t in SCHEDULER_TYPES)
                          + f", got {schedule.lr_scheduler_type!r}")
    if schedule.warmup_steps < 0:
        raise MixcliError(f"{where}: 'warmup_steps' must be >= 0, got {schedule.warmup_steps}")
    for key in ("warmup_ratio", "min_lr_rate"):
        value = getattr(schedule, key)
        if not (math.isfinite(value) and 0 <= value <= 1):
            raise MixcliError(f"{where}: '{key}' must be a number in [0, 1], got {value!r}")
    return schedule


def scheduler(optimizer, total: int, schedule: Schedule):
    """A torch ``LambdaLR`` following ``schedule`` over ``total`` steps."""
    import torch

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule.factor(step, total))


# -- the loop ----------------------------------------------------------------------------------

@dataclass
class Step:
    """What one training step gives the loop: ``loss`` to back-propagate (None when the step
    back-propagated itself, part by part) and the ``values`` to record (``"loss"`` among them)."""

    loss: object = None
    values: dict = field(default_factory=dict)


@dataclass
class LossRecord:
    """Per step, the values a step recorded, with its number (1-based) as ``"step"``."""

    rows: list = field(default_factory=list)

    def add(self, step: int, values: dict) -> None:
        self.rows.append({"step": step, **values})

    def column(self, key: str) -> list:
        return [row[key] for row in self.rows]

    @property
    def last(self) -> dict:
        return self.rows[-1] if self.rows else {}


def train_steps(step: Callable[[int], Step], params, optimizer, steps: int, *, schedule: Schedule | None = None,
                grad_clip: float = 0.0, label: str = "training", progress: bool = True, shown: str = "loss",
                after_step: Callable[[int], None] | None = None) -> LossRecord:
    """Run ``steps`` optimizer steps. Each calls ``step(index)`` after zeroing the gradients,
    back-propagates its loss, averages the gradients of ``params`` over the processes, clips
    their norm to ``grad_clip`` (0: no clipping), steps the optimizer and the ``schedule``, and
    records the step's values with the learning rate it used (``"lr"``); the bar (on process 0, when ``progress``) shows ``values["loss"]``
    as ``shown``. ``after_step(number)`` runs last in each step."""
    import torch

    from .progress import progress as progress_bar

    lr = scheduler(optimizer, steps, schedule) if schedule is not None else None
    record = LossRecord()
    world = current_world()
    with progress_bar(label, steps, enabled=progress and world.main) as bar:
        for index in range(steps):
            optimizer.zero_grad(set_to_none=True)
            rate = optimizer.param_groups[0]["lr"]
            out = step(index)
            if out.loss is not None:
                out.loss.backward()
            average_gradients(params)
            if grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            optimizer.step()
            if lr is not None:
                lr.step()
            record.add(index + 1, {**out.values, "lr": rate})
            if "loss" in out.values:
                bar.advance(**{shown: out.values["loss"]})
            else:
                bar.advance()
            if after_step is not None:
                after_step(index + 1)
    return record


# -- the loss curve ----------------------------------------------------------------------------

def loss_curve(steps: list, curves: dict, title: str, ylabel: str = "loss", bold: str | None = None,
               points: dict | None = None) -> bytes:
    """A PNG of ``curves`` (label -> values per step) over ``steps``; the curve ``bold`` is drawn
    thick in black, ``points`` (label -> (steps, values)) as dots."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    for name, values in curves.items():
        if name == bold:
            axis.plot(steps, values, label=name, color="black", linewidth=2)
        else:
            axis.plot(steps, values, label=name, linewidth=1, alpha=0.8)
    for name, (xs, ys) in (points or {}).items():
        axis.scatter(xs, ys, color="black", zorder=3, label=name)
    axis.set_xlabel("step")
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.legend(fontsize=7, ncol=2 if len(curves) > 4 else 1)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()
