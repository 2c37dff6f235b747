"""What the two router trainers (test-time adaptation in :mod:`.tta`, PWE-MoE in :mod:`.pareto`)
share on top of mixcli's training runtime: each task's stream of samples, the router-only
optimizer and the ``[adapt]`` table's learning-rate schedule."""

from __future__ import annotations


class Stream:
    """A task's endless, seeded shuffle of sample indices."""

    def __init__(self, size: int, seed: int):
        import torch

        self.size, self.gen, self.order, self.pos = size, torch.Generator().manual_seed(seed), None, 0

    def take(self, count: int):
        import torch

        out = []
        while len(out) < count:
            if self.order is None or self.pos >= self.size:
                self.order, self.pos = torch.randperm(self.size, generator=self.gen), 0
            step = min(count - len(out), self.size - self.pos)
            out.extend(self.order[self.pos:self.pos + step].tolist())
            self.pos += step
        return torch.tensor(out)


def router_optimizer(model, device, lr: float, seed: int):
    """Seed torch, move ``model`` to ``device`` in eval mode (no dropout; gradients still reach
    the routers), freeze everything but the routers; return them and an Adam over them."""
    import torch

    torch.manual_seed(seed)
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    params = model.router_parameters()
    for p in params:
        p.requires_grad_(True)
    return params, torch.optim.Adam(params, lr=lr)


def schedule(opts: dict):
    """The learning-rate schedule of the ``[adapt]`` settings (:func:`mixcli_wemoe.adapt.settings`)."""
    from mixcli.training import SCHEDULE_KEYS, Schedule

    return Schedule(**{key: opts[key] for key in SCHEDULE_KEYS})


def history(record, tasks: list, **extra) -> dict:
    """A loss record as ``adapt_log.json`` stores it: columns ``step``, ``loss`` and, per task
    name, its own loss, and the learning rate of each step (the steps recorded it under ``("task", name)``)."""
    return {"step": record.column("step"), "loss": record.column("loss"), "lr": record.column("lr"),
            "tasks": {t.name: record.column(("task", t.name)) for t in tasks}, **extra}


def loss_plot(history: dict, title: str) -> bytes:
    """The loss curve PNG of an ``adapt_log.json`` history: the total in bold, one line per task."""
    from mixcli.training import loss_curve

    return loss_curve(history["step"], {"total": history["loss"], **history["tasks"]}, title,
                      ylabel=history.get("ylabel", "entropy"), bold="total")
