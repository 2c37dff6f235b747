"""Training the routers: the ``[adapt]`` table, the tasks it reads, the report and the
written record. The training itself is test-time adaptation (:mod:`.tta`, entropy
minimisation, spec §1.4) for we_moe, sparse_we_moe and rank_one_moe and labeled LS/EPO
training (:mod:`.pareto`) for pwe_moe, both on mixcli's training runtime
(:mod:`mixcli.training`: processes under torchrun, loop, learning-rate schedule, loss curve).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from mixcli import MixcliError
from mixcli.errors import first_line

# key -> (default, type, help); the README lists the same
KEYS = {
    "tasks": ([], list, "expert model names whose heads and data are used (default: every expert)"),
    "split": ("test", str, "data split read from task.json (recorded in the output)"),
    "max_samples": (0, int, "use at most this many samples per task (0: all)"),
    "max_steps": (1000, int, "optimizer steps"),
    "lr": (1e-4, float, "Adam learning rate"),
    "lr_scheduler_type": ("constant", str, "'constant' (the paper), 'linear' or 'cosine' (decay to "
                                           "min_lr_rate·lr at the last step); pwe_moe: 'cosine'"),
    "warmup_steps": (0, int, "steps of linear warm-up to lr (0: none, or warmup_ratio)"),
    "warmup_ratio": (0.0, float, "warm-up as a share of max_steps, used when warmup_steps is 0"),
    "min_lr_rate": (0.0, float, "where linear and cosine decay end, as a multiple of lr; pwe_moe: 0.1"),
    "batch_size": (16, int, "samples per task per step (the global batch under torchrun)"),
    "batch_reduce": (True, bool, "route with the batch mean during adaptation (inference stays per sample)"),
    "use_grad_accumulate": (True, bool, "back-propagate task by task (same gradient, less memory)"),
    "logit_scale": (1.0, float, "multiply head logits before the entropy"),
    "task_id_weight": (0.0, float, "anti-collapse term: weight of a loss teaching routers which task stream "
                                   "an input came from (no labels used); 0 = the paper's objective"),
    "task_id_loss": ("ce", str, "form of that term: 'ce' (the stream's task vector ranks first) or 'one_hot' "
                                "(coefficients pulled toward the oracle routing: 1 on the stream's task, 0 elsewhere)"),
    "eval_every": (0, int, "every N steps log routing statistics and held-out accuracy (0: only at the end)"),
    "device": ("cpu", str, "torch device"),
    "seed": (None, int, "seed of the data streams (default: the project seed)"),
    "objective": ("", str, "pwe_moe only: 'ls' (linear scalarization) or 'epo'"),
    "alpha": (1.0, float, "pwe_moe only: Dirichlet concentration of the sampled preferences"),
    "eval_grid_m": (2, int, "pwe_moe only: preference grid of multiples of 1/(m-1) evaluated at the end"),
}
# the string keys that accept only these values
CHOICES = {"task_id_loss": ("ce", "one_hot")}
# pwe_moe's own defaults (FusionBench's): a lower lr, annealed along a cosine to 0.1·lr
PWE_DEFAULTS = {"lr": 1e-5, "lr_scheduler_type": "cosine", "min_lr_rate": 0.1}


def settings(section: dict, where: str, pwe: bool = False) -> dict:
    from mixcli.errors import closest

    from mixcli.training import Schedule, read_schedule

    out = {}
    for key, value in section.items():
        if key == "lr_schedule":  # the name before the shared schedule
            raise MixcliError(f"{where}: 'lr_schedule' is now 'lr_scheduler_type'; lr_schedule = \"cosine\" was "
                              "lr_scheduler_type = \"cosine\" with min_lr_rate = 0.1")
        if key not in KEYS:
            raise MixcliError(f"{where}: unknown key '{key}'{closest(key, KEYS)}")
        default, kind, _ = KEYS[key]
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise MixcliError(f"{where}: '{key}' must be a {kind.__name__}, got {value!r}")
        if kind is float and not math.isfinite(value):  # Adam refuses NaN; Inf trains NaN routers
            raise MixcliError(f"{where}: '{key}' must be a finite number, got {value!r}")
        if kind in (int, float) and value < 0:
            raise MixcliError(f"{where}: '{key}' must be >= 0, got {value!r}")
        out[key] = value
    full = {key: out.get(key, default) for key, (default, _, _) in KEYS.items()}
    for key, allowed in CHOICES.items():
        if full[key] not in allowed:
            raise MixcliError(f"{where}: '{key}' must be " + " or ".join(repr(a) for a in allowed)
                              + f", got {full[key]!r}")
    if full["batch_size"] < 1:
        raise MixcliError(f"{where}: 'batch_size' must be >= 1")
    if pwe:
        full["objective"] = full["objective"] or "ls"
        if full["objective"] not in ("ls", "epo"):
            raise MixcliError(f"{where}: 'objective' must be 'ls' or 'epo', got {full['objective']!r}")
        full.update({key: value for key, value in PWE_DEFAULTS.items() if key not in out})
    elif full["objective"]:
        raise MixcliError(f"{where}: 'objective' applies to pwe_moe only")
    read_schedule(full, where, Schedule())  # the schedule's own checks (names, ranges)
    return full


def check_device(name: str, where: str) -> None:
    """A device torch knows and this machine has, or a one-line error."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise MixcliError(f"{where}: 'device' must be a torch device such as \"cpu\" or \"cuda\", got {name!r}") from None
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as error:  # torch's "not compiled with" / "no device" errors
        reason = first_line(error).split(". ")[0]
        raise MixcliError(f"{where}: 'device' is {name!r}, which torch cannot use here ({reason}); "
                          "use \"cpu\"") from None


def load_tasks(model, folders: dict, opts: dict, where: str, split: str | None = None) -> list:
    """Tasks of the experts named in ``opts['tasks']`` (all by default); ``folders`` maps names to paths."""
    from .tasks import read_task

    names = list(model.config.expert_names)
    chosen = opts["tasks"] or names
    for name in chosen:
        if name not in names:
            raise MixcliError(f"{where}: task '{name}' is not an expert of this model (experts: {', '.join(names)})")
    return [read_task(name, Path(folders[name]), split or opts["split"], model.config.backbone_config, where,
                      opts["max_samples"]) for name in chosen]


def report(model, tasks: list, opts: dict, history: dict, log=print) -> dict:
    """Routing statistics, collapse check, accuracies and the oracle-routing bound."""
    from .diagnostics import accuracy, collapse, oracle_accuracy, routing_stats, specificity, stats_table

    device = opts["device"]
    names = list(model.config.expert_names)
    stats = routing_stats(model, tasks, device)
    reason = collapse(stats, names)
    accs = {t.name: accuracy(model, t, device) for t in tasks}
    oracle = oracle_accuracy(model, tasks, device) if model.config.router_input == "hidden" else {}
    log("routing per task (mean coefficient per expert, per-sample routing):\n" + stats_table(stats, names))
    if reason:
        log(f"warning: {reason}; try task_id_weight > 0, a larger logit_scale or a lower lr")
    if all(a is not None for a in accs.values()) and accs:
        log("accuracy (labels for monitoring only): " + ", ".join(f"{n} {a:.3f}" for n, a in accs.items()))
    if oracle and all(a is not None for a in oracle.values()):
        log("oracle routing (each task forced onto its own task vector): "
            + ", ".join(f"{n} {a:.3f}" for n, a in oracle.items())
            + f"; mean {sum(oracle.values()) / len(oracle):.3f}")
    return {"routing": stats, "specificity": specificity(stats, names), "collapse": reason,
            "accuracy": accs, "oracle_accuracy": oracle,
            "final_loss": history["loss"][-1] if history["loss"] else None}


def run(model, folders: dict, opts: dict, seed: int, where: str, log=print, progress: bool = False) -> dict:
    """Adapt ``model`` in place (TTA, or PWE training); return the record saved in its config."""
    import torch

    from mixcli.training import current_world

    from .tta import tta

    check_device(opts["device"], where)
    pwe = model.config.router_input == "preference"
    tasks = load_tasks(model, folders, opts, where, "train" if pwe and opts["split"] == "test" else None)
    if pwe:
        from .pareto import train_pwe

        record = train_pwe(model, tasks, opts, seed, where, log, progress)
        record["threads"] = torch.get_num_threads()
        return record
    from .diagnostics import accuracy

    main = current_world().main
    before = {t.name: accuracy(model, t, opts["device"]) for t in tasks} if main else {}
    history = tta(model, tasks, opts, seed, where, log, progress)
    record = {"accuracy_before": before, "settings": opts, "seed": seed, "objective": "entropy",
              "threads": torch.get_num_threads(),
              "data": {t.name: {"split": t.split, "path": t.data_path} for t in tasks}}
    pruned = prune_routers(model)
    if pruned is not None:
        record["post_sparse_gate"] = pruned
    if main:
        record.update(report(model, tasks, opts, history, log))
    record["history"] = history
    return record


def prune_routers(model) -> dict | None:
    """sparse_we_moe's ``post_sparse_gate``: after adaptation, every router parameter tensor is
    magnitude-pruned by ``gate_prune_ratio`` (a shared router once); the share of zeros."""
    import torch

    from .layers import prune_magnitude

    params = (model.config.mixcli or {}).get("parameters", {})
    if model.config.method != "sparse_we_moe" or not params.get("post_sparse_gate"):
        return None
    ratio = float(params.get("gate_prune_ratio", 0.0))
    routers = model.router_parameters()
    with torch.no_grad():
        for p in routers:
            p.copy_(prune_magnitude(p, ratio))
    zeros = sum(int((p == 0).sum()) for p in routers) / max(1, sum(p.numel() for p in routers))
    return {"gate_prune_ratio": ratio, "zero_fraction": zeros}


def finish(folder: Path, record: dict) -> None:
    """The adaptation's record into the ``config.json`` written in ``folder`` (``mixcli.adapt``),
    its loss curve and per-step log beside it."""
    from mixcli.provenance import update_config

    record = dict(record)
    history = record.pop("history", None)
    record = json.loads(json.dumps(record, default=str))
    update_config(folder, lambda config: config["mixcli"].__setitem__("adapt", record))
    if history:
        from ._training import loss_plot

        title = "PWE-MoE router training" if record.get("objective") in ("ls", "epo") else "router adaptation"
        (folder / "adapt_loss.png").write_bytes(loss_plot(history, title))
        (folder / "adapt_log.json").write_text(json.dumps(history) + "\n")


def write_routers(model, folder: Path) -> None:
    """Overwrite the routers (the only parameters adaptation changes) in the safetensors files
    written in ``folder``, each in the place and dtype its file gives it: shards and dtypes
    stay what the engine wrote."""
    import torch

    from mixcli.checkpoint import open_safetensors
    from mixcli.safetensors_io import torch_dtype

    stored = open_safetensors(Path(folder), "adapt")
    for name, value in model.state_dict().items():
        if not name.startswith("routers."):
            continue
        info = stored[name]
        data = value.detach().cpu().to(torch_dtype(info.dtype)).contiguous()
        with open(info.file.path, "r+b") as handle:
            handle.seek(info.begin)
            handle.write(data.reshape(-1).view(torch.uint8).numpy().tobytes())


class _Value:
    def __init__(self, value, code):
        self.value, self.code = value, code

    def __call__(self):
        from mixcli.safetensors_io import torch_dtype

        return self.value.to(torch_dtype(self.code)).contiguous()


def adapted_plan(plan, model, record: dict, folders: dict):
    """``plan`` with every tensor taken from the adapted in-memory ``model`` (nothing computed
    again), in the dtype the plan writes; the inputs' hashes (``folders``: model name -> path)
    and the record are added when it is written."""
    import dataclasses

    from mixcli.provenance import record_input_hashes

    state = model.state_dict()
    tensors = [dataclasses.replace(t, compute=_Value(state[t.name], t.dtype), reads=[], fill=None)
               for t in plan.tensors]

    def finalize(folder: Path) -> None:
        record_input_hashes(folder, folders)
        finish(folder, record)

    return dataclasses.replace(plan, tensors=tensors, finalize=finalize)


def attach(plan, context) -> None:
    """With an ``[adapt]`` table, ``mixcli merge`` adapts the written model before it appears:
    the model is loaded back from the temporary folder, trained on every core, and its routers
    are rewritten in place."""
    section = context.sections.get("adapt")
    if section is None:
        return
    where = f"{context.project.where}: [adapt]"
    opts = settings(section, where, pwe=context.project.method == "pwe_moe")
    folders = {name: ckpt.path for name, ckpt in context.models.items()}
    seed = context.seed if opts["seed"] is None else opts["seed"]
    check_tasks(context, opts, where)
    previous = plan.finalize

    def finalize(folder: Path) -> None:
        import torch

        from mixcli.engine import all_cores
        from mixcli.loading import from_pretrained

        from .modeling import WEMoEModel

        if previous is not None:
            previous(folder)
        model = from_pretrained(WEMoEModel, folder, where, dtype=torch.float32)
        with all_cores():
            record = run(model, folders, opts, seed, where, log=lambda m: print(m, file=sys.stderr),
                         progress=True)
        write_routers(model, folder)
        finish(folder, record)

    plan.finalize = finalize
    plan.notes.append(f"routers adapted for {opts['max_steps']} steps ([adapt])")


def check_tasks(context, opts: dict, where: str) -> None:
    """Every adapted task has a head, a task.json and its data file (before any tensor is written)."""
    from mixcli.features import task_feature

    from .tasks import data_path, task_files

    experts = [name for name in context.models if name != context.project.base]
    split = opts["split"]
    if context.project.method == "pwe_moe" and split == "test":
        split = "train"
    for name in opts["tasks"] or experts:
        if name not in experts:
            raise MixcliError(f"{where}: task '{name}' is not an expert of this project "
                              f"(experts: {', '.join(experts)})")
        folder = Path(context.models[name].path)
        info, _ = task_files(name, folder, where)
        task_feature(info, folder / "task.json", f"{where}: task '{name}'")
        data_path(name, info, folder, split, where)


def is_finite(history: dict) -> bool:
    return all(math.isfinite(v) for v in history["loss"])
