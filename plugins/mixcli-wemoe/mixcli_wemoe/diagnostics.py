"""Measuring a routed model per task: accuracy, routing statistics, collapse, oracle routing.

Routing statistics: for every task, the coefficients its inputs receive, averaged over
samples and blocks and summed per expert (rank-one pools: over each task's components), an
``n``-vector. Collapse (entropy minimisation on small models can route every task alike
while the entropy still falls) is declared when the tasks' vectors are nearly the same
(spread below 10% of their size) or every task's largest coefficient is the same expert.
Oracle routing forces each task's inputs onto its own task vector (coefficient 1, others 0):
the upper bound any router of this construction can reach.
"""

from __future__ import annotations

import torch

from .tasks import Task, logits


@torch.no_grad()
def accuracy(model, task: Task, device, batch_size: int = 256, forced=None) -> float | None:
    if task.labels is None:
        return None
    model.eval()
    correct = 0
    for start in range(0, len(task), batch_size):
        index = slice(start, start + batch_size)
        if forced is not None:
            with model.forced_routing(forced):
                z = logits(model, task, task.batch(index), device)
        else:
            z = logits(model, task, task.batch(index), device)
        correct += (z.argmax(-1).cpu() == task.labels[index]).sum().item()
    return correct / max(len(task), 1)


def one_hot(model, expert: int) -> torch.Tensor:
    cfg = model.config
    k = cfg.rank_k if cfg.expert_kind == "rank_one" else 1
    c = torch.zeros(cfg.num_components)
    c[expert * k:(expert + 1) * k] = 1.0
    return c


def oracle_accuracy(model, tasks: list[Task], device, batch_size: int = 256) -> dict:
    names = list(model.config.expert_names)
    out = {}
    for task in tasks:
        if task.name in names:
            out[task.name] = accuracy(model, task, device, batch_size, forced=one_hot(model, names.index(task.name)))
    return out


@torch.no_grad()
def routing_stats(model, tasks: list[Task], device, samples: int = 256) -> dict:
    """task -> mean coefficient per expert (n-vector, as a list), per-sample routing."""
    cfg = model.config
    k = cfg.rank_k if cfg.expert_kind == "rank_one" else 1
    old = model.routing.batch_reduce
    model.set_batch_reduce(False)
    model.eval()
    stats = {}
    try:
        for task in tasks:
            with model.recording() as record:
                logits(model, task, task.batch(slice(0, samples)), device)
            coeffs = torch.stack([c if c.dim() == 1 else c.mean(0) for _, c in record]).mean(0).cpu()
            stats[task.name] = coeffs.reshape(cfg.num_experts, k).sum(1).tolist()
    finally:
        model.set_batch_reduce(old)
    return stats


def collapse(stats: dict, names: list[str]) -> str | None:
    """A one-line reason when routing is task-agnostic, else None."""
    if len(stats) < 2:
        return None
    m = torch.tensor(list(stats.values()))
    spread = (m - m.mean(0)).norm(dim=1).mean().item()
    size = m.norm(dim=1).mean().item() or 1.0
    if spread < 0.1 * size:
        return (f"routing is task-agnostic: the tasks' mean coefficients differ by {spread / size:.1%} of their "
                "size (every task gets nearly the same merge)")
    winners = m.argmax(1).tolist()
    if len(set(winners)) == 1 and len(names) > 2:
        return f"routing collapsed onto one expert: every task's largest coefficient is '{names[winners[0]]}'"
    return None


def stats_table(stats: dict, names: list[str]) -> str:
    width = max(len(n) for n in list(names) + list(stats)) + 2
    lines = ["task".ljust(width) + "".join(n[:8].rjust(9) for n in names) + "   own-rank"]
    for task, row in stats.items():
        own = names.index(task) if task in names else None
        rank = "-" if own is None else str(1 + sorted(row, reverse=True).index(row[own]))
        lines.append(task.ljust(width) + "".join(f"{v:9.3f}" for v in row) + f"   {rank:>8}")
    return "\n".join(lines)


def specificity(stats: dict, names: list[str]) -> float:
    """Fraction of tasks whose own expert gets the largest coefficient."""
    hits = [names.index(t) == max(range(len(row)), key=row.__getitem__) for t, row in stats.items() if t in names]
    return sum(hits) / max(len(hits), 1)
