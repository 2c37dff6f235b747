"""Test-time adaptation (TTA) of we_moe, sparse_we_moe and rank_one_moe (spec §1.4): entropy
minimisation of the routers on unlabeled inputs.

Per step, every task draws ``batch_size`` unlabeled inputs from its own stream (seeded
shuffles, cycling), the loss is the mean prediction entropy of its head; only router
parameters train (Adam, with the ``[adapt]`` learning-rate schedule; constant by default, as
in the paper). Under ``torchrun`` every process takes an equal share of each task's batch and
the router gradients are averaged across processes (:mod:`mixcli.training`), so N processes
follow the same trajectory as one with the same global batch.
"""

from __future__ import annotations

ROUTE_TEMPERATURE = 0.1


def entropy(z):
    import torch

    p = torch.softmax(z, dim=-1)
    return -(p * torch.log(p + 1e-8)).sum(-1)


def tta(model, tasks: list, opts: dict, seed: int, where: str, log=print, progress: bool = False) -> dict:
    """Entropy minimisation of the routers, in place; returns the loss history."""
    import torch

    from mixcli.training import Step, all_reduce, current_world, train_steps

    from ._training import Stream, history, router_optimizer, schedule
    from .tasks import logits

    world = current_world()
    device = torch.device(opts["device"])
    mine = world.share(opts["batch_size"], where)
    names = list(model.config.expert_names)
    params, opt = router_optimizer(model, device, opts["lr"], seed)
    streams = [Stream(len(t), seed * 1000 + i) for i, t in enumerate(tasks)]
    old_reduce = model.routing.batch_reduce
    model.set_batch_reduce(opts["batch_reduce"])
    k = model.config.rank_k if model.config.expert_kind == "rank_one" else 1

    def step(_):
        total, parts = 0.0, []
        for task, stream in zip(tasks, streams):
            index = stream.take(opts["batch_size"])[mine]
            with model.recording() as record:
                z = logits(model, task, task.batch(index), device) * opts["logit_scale"]
            loss = entropy(z).mean()
            parts.append(loss.detach())
            if opts["task_id_weight"] and task.name in names:
                loss = loss + opts["task_id_weight"] * _task_id_loss(record, names.index(task.name), k,
                                                                      opts["task_id_loss"])
            if opts["use_grad_accumulate"]:
                loss.backward()
            else:
                total = total + loss
        values = all_reduce(torch.stack(parts), mean=True).cpu().tolist()
        return Step(None if opts["use_grad_accumulate"] else total,
                    {"loss": sum(values), **{("task", t.name): v for t, v in zip(tasks, values)}})

    def monitor(number: int) -> None:
        if world.main and opts["eval_every"] and number % opts["eval_every"] == 0:
            _monitor(model, tasks, device, log, number)

    try:
        record = train_steps(step, params, opt, opts["max_steps"], schedule=schedule(opts),
                             label="adapting routers", progress=progress, shown="entropy", after_step=monitor)
    finally:
        model.set_batch_reduce(old_reduce)
        for p in params:
            p.requires_grad_(False)
    return history(record, tasks)


def _task_id_loss(record, target: int, k: int, form: str = "ce"):
    """How far each block's coefficients are from naming the stream's task: cross-entropy of the
    per-expert sums (temperature 0.1), or ("one_hot") the mean squared distance to the oracle
    routing, 1 on every coefficient of the stream's task and 0 elsewhere."""
    import torch
    import torch.nn.functional as F

    losses = []
    for _, c in record:
        c = c if c.dim() == 2 else c.unsqueeze(0)
        c = c.reshape(c.shape[0], -1, k)
        if form == "one_hot":
            oracle = torch.zeros_like(c)
            oracle[:, target] = 1.0
            losses.append(F.mse_loss(c, oracle))
        else:
            losses.append(F.cross_entropy(c.sum(-1) / ROUTE_TEMPERATURE,
                                          torch.full((c.shape[0],), target, device=c.device)))
    return torch.stack(losses).mean()


def _monitor(model, tasks, device, log, step) -> None:
    from .diagnostics import accuracy, collapse, routing_stats

    names = list(model.config.expert_names)
    stats = routing_stats(model, tasks, device)
    accs = {t.name: accuracy(model, t, device) for t in tasks}
    shown = ", ".join(f"{n} {a:.3f}" for n, a in accs.items() if a is not None)
    log(f"step {step}: held-out accuracy (monitoring only) {shown or 'n/a'}")
    reason = collapse(stats, names)
    if reason:
        log(f"warning: step {step}: {reason}")
