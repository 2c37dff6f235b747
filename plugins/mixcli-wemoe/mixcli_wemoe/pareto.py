"""PWE-MoE training (spec §5.2): per step a preference ``p ~ Dirichlet(α·1)`` is set on every
router, each task contributes the cross-entropy ``L_i`` of its head on a labeled batch of its
**train** split, and the routers descend

* LS (linear scalarization): ``Σ p_i L_i``;
* EPO (Mahapatra & Rajan, ICML 2020): ``n · Σ a_i L_i`` with ``a`` from a small linear program
  over the per-task gradients (a *balance* step while the loss profile ``p ⊙ L`` is not uniform,
  else a *descent* step); ``a = p / Σp`` when the LP fails. Solved with scipy's HiGHS.

Adam, with the ``[adapt]`` learning-rate schedule (by default cosine annealing from ``lr`` to
``0.1·lr``); the processes, loop and schedule are mixcli's training runtime. At the end every
point of the preference grid (multiples of ``1/(m−1)``) is evaluated when the data has labels.
"""

from __future__ import annotations

import itertools

import numpy as np

EPS = 1e-4


def epo_weights(losses: np.ndarray, grads: np.ndarray, pref: np.ndarray) -> tuple[np.ndarray, str]:
    """EPO's LP: ``losses`` [n], ``grads`` [n, P] per-task gradients, ``pref`` [n]."""
    from scipy.optimize import linprog

    n = len(losses)
    fallback = pref / pref.sum()
    rl = pref * np.maximum(losses, 1e-12)
    l_hat = rl / rl.sum()
    mu = float(np.sum(l_hat * np.log(np.maximum(l_hat * n, 1e-12))))  # KL(l_hat || uniform)
    adjust = pref * (np.log(np.maximum(l_hat * n, 1e-12)) - mu)
    gram = grads @ grads.T
    ca = gram @ adjust
    a_eq, b_eq = np.ones((1, n)), np.array([1.0])
    if mu > EPS:  # balance: move the losses towards the preference ray
        mode = "balance"
        rhs = ca.copy()
        favoured = ca > 0
        if favoured.any():
            rhs[favoured] = -np.inf
            rhs[rl == rl.max()] = 0.0
        else:
            rhs = np.zeros(n)
        keep = np.isfinite(rhs)
        result = linprog(-ca, A_ub=-gram[keep], b_ub=-rhs[keep], A_eq=a_eq, b_eq=b_eq, bounds=[(0, None)] * n,
                         method="highs")
    else:  # descent: decrease every loss, staying on the ray
        mode = "descent"
        a_ub = np.vstack([-gram, -ca[None, :]])
        b_ub = np.concatenate([np.zeros(n), [min(ca.max(), 0.0)]])
        result = linprog(-gram.sum(0), A_ub=a_ub, b_ub=b_ub, A_eq=a_eq, b_eq=b_eq, bounds=[(0, None)] * n,
                         method="highs")
    if not result.success or not np.all(np.isfinite(result.x)):
        return fallback, "fallback"
    return np.clip(result.x, 0, None), mode


def grid(n: int, m: int) -> list[list[float]]:
    """Every point of the simplex whose coordinates are multiples of ``1/(m−1)``."""
    steps = max(m - 1, 1)
    return [[c / steps for c in combo] for combo in itertools.product(range(steps + 1), repeat=n)
            if sum(combo) == steps]


def train_pwe(model, tasks: list, opts: dict, seed: int, where: str, log=print, progress: bool = False) -> dict:
    import torch
    import torch.nn.functional as F

    from mixcli import MixcliError
    from mixcli.training import Step, current_world, train_steps

    from ._training import Stream, history, router_optimizer, schedule
    from .diagnostics import accuracy
    from .tasks import logits

    world = current_world()
    device = torch.device(opts["device"])
    n, steps = model.config.num_experts, opts["max_steps"]
    names = list(model.config.expert_names)
    for task in tasks:
        if task.labels is None:
            raise MixcliError(f"{where}: task '{task.name}' has no labels in {task.data_path}; pwe_moe trains on "
                              "labeled data")
    mine = world.share(opts["batch_size"], where)
    params, opt = router_optimizer(model, device, opts["lr"], seed)
    dirichlet = torch.distributions.Dirichlet(torch.full((n,), float(opts["alpha"])))
    streams = [Stream(len(t), seed * 1000 + i) for i, t in enumerate(tasks)]
    moves: dict = {}

    def step(_):
        pref = dirichlet.sample()
        model.set_preference(pref)
        losses = []
        for task, stream in zip(tasks, streams):
            index = stream.take(opts["batch_size"])[mine]
            z = logits(model, task, task.batch(index), device)
            losses.append(F.cross_entropy(z, task.labels[index].to(device)))
        weights = torch.stack([pref[names.index(t.name)] for t in tasks]).to(device)
        if opts["objective"] == "epo":
            grads = []
            for loss in losses:
                g = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
                grads.append(torch.cat([(x if x is not None else torch.zeros_like(p)).flatten()
                                        for x, p in zip(g, params)]))
            a, move = epo_weights(np.array([float(v.detach()) for v in losses]), torch.stack(grads).cpu().double().numpy(),
                                  weights.cpu().double().numpy())
            moves[move] = moves.get(move, 0) + 1
            total = len(losses) * sum(float(w) * loss for w, loss in zip(a, losses))
        else:
            total = sum(w * loss for w, loss in zip(weights, losses))
        values = [float(v.detach()) for v in losses]
        return Step(total, {"loss": sum(values), **{("task", t.name): v for t, v in zip(tasks, values)}})

    try:
        record = train_steps(step, params, opt, steps, schedule=schedule(opts),
                             label="training preference routers", progress=progress)
    finally:
        for p in params:
            p.requires_grad_(False)
    front = []
    for point in grid(n, opts["eval_grid_m"]):
        model.set_preference([v + 1e-12 for v in point])
        front.append({"preference": point, "accuracy": {t.name: accuracy(model, t, device) for t in tasks}})
    model.set_preference([1.0] * n)
    if world.main:
        for row in front:
            log(f"preference {row['preference']}: " + ", ".join(f"{k} {v:.3f}" for k, v in row["accuracy"].items()))
    return {"objective": opts["objective"], "settings": opts, "seed": seed, "front": front,
            "history": history(record, tasks, ylabel="cross-entropy", moves=moves),
            "data": {t.name: {"split": t.split, "path": t.data_path} for t in tasks}}
