"""Quality of the weight-ensembling MoE family on the model zoo's vision tasks (prints a table).

    PYTHONPATH=plugins/mixcli-zoo python benchmarks/wemoe_quality.py [--zoo /tmp/zoo] [--size full]
        [--steps 300] [--device cpu] [--upscale-attn] [--rows we_moe,sparse,rank_one,pwe]

Rows: individual experts, task arithmetic (λ 0.3), TIES (mixcli-merge), WE-MoE before/after
test-time adaptation (paper objective, and with the task-stream anti-collapse term), the
oracle-routing bound, sparse WE-MoE at 90% pruning, rank-one MoE, PWE-MoE (LS) at the one-hot
preferences (``--upscale-attn`` routes the attention projections too in the WE-MoE rows;
``--rows`` picks which adapted rows run); PWE-MoE's per-task accuracy across a preference grid is plotted to
``wemoe_pwe_front.png``. Targets: WE-MoE >= 95% of the experts' mean; sparse within 1 point.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
import transformers


def accuracy_table(backbone, tasks, device) -> dict:
    from mixcli_wemoe.diagnostics import accuracy

    return {t.name: accuracy(backbone, t, device) for t in tasks}


class Plain(torch.nn.Module):
    """A stock backbone with the model API that diagnostics.accuracy expects."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, **kw):
        return self.backbone(**kw)


def project_text(zoo: Path, manifest: dict, method: str, params: str, adapt: str = "") -> str:
    models = "\n".join(f'{e["task"]} = "{zoo / e["path"]}"' for e in manifest["experts"])
    text = f'[models]\nbase = "{zoo / manifest["base"]}"\n{models}\n\n[method]\nname = "{method}"\nbase = "base"\n{params}\n'
    return text + (f"\n[adapt]\n{adapt}\n" if adapt else "")


def build(text: str, folder: Path, device: str, adapt: bool):
    from mixcli.core import prepare
    from mixcli_wemoe import adapt as adapt_mod
    from mixcli_wemoe.construction import model_from_plan

    path = folder / "p.toml"
    path.write_text(text)
    prepared = prepare(path)
    model = model_from_plan(prepared.plan, device)
    record = None
    if adapt:
        opts = adapt_mod.settings(dict(prepared.project.sections.get("adapt", {})), "[adapt]",
                                  pwe=prepared.project.method == "pwe_moe")
        opts["device"] = device
        folders = {n: c.path for n, c in prepared.models.items()}
        record = adapt_mod.run(model, folders, opts, 0, "[adapt]", log=lambda m: print("   ", m, file=sys.stderr))
    return model, record


def merged_backbone(text: str, folder: Path):
    from mixcli import engine
    from mixcli.core import prepare

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "m.toml"
    path.write_text(text + '\n[output]\npath = "merged"\n')
    prepared = prepare(path)
    engine.write_plan(prepared.plan, folder / "merged", force=True, progress=False)
    return transformers.AutoModel.from_pretrained(folder / "merged").eval()


def main(argv=None) -> None:
    from mixcli.plugins import register_architectures
    from mixcli_wemoe.adapt import load_tasks, settings
    from mixcli_wemoe.diagnostics import oracle_accuracy
    from mixcli_zoo.build import build_zoo

    ap = argparse.ArgumentParser()
    ap.add_argument("--zoo", type=Path, default=Path("/tmp/mixcli-zoo"))
    ap.add_argument("--size", default="full")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--init-lambda", type=float, default=0.5, help="λ of task arithmetic and of the routers' start")
    ap.add_argument("--upscale-attn", action="store_true", help="WE-MoE family: route attention projections too")
    ap.add_argument("--task-id-loss", default="ce", choices=("ce", "one_hot"), help="form of the task-stream term")
    ap.add_argument("--task-id-weight", type=float, default=1.0, help="weight of the task-stream term")
    ap.add_argument("--lr-scheduler-type", default="constant", choices=("constant", "linear", "cosine"),
                    help="adaptation lr schedule (linear and cosine decay to 0.1·lr)")
    ap.add_argument("--per-sample", action="store_true", help="adapt with per-sample routing (batch_reduce = false)")
    ap.add_argument("--lr", type=float, default=1e-3, help="adaptation learning rate (PWE-MoE: 10x)")
    ap.add_argument("--rows", default="merges,entropy,we_moe,sparse,rank_one,pwe", help="adapted rows to run")
    args = ap.parse_args(argv)
    wanted = set(args.rows.split(","))
    register_architectures()
    manifest = build_zoo(args.zoo, size=args.size, families=("vision",))["vision"]
    zoo, dev = args.zoo, args.device
    rows: dict[str, dict] = {}
    tmp = Path(tempfile.mkdtemp(prefix="wemoe-bench-"))
    tta = f"max_steps = {args.steps}\nlr = {args.lr}\nlr_scheduler_type = \"{args.lr_scheduler_type}\"\nmin_lr_rate = 0.1" + ("\nbatch_reduce = false" if args.per_sample else "")
    lam = args.init_lambda
    init = f"init_lambda = {lam}" + ("\nupscale_attn = true" if args.upscale_attn else "")
    model, _ = build(project_text(zoo, manifest, "we_moe", init), tmp, dev, False)
    tasks = load_tasks(model, {e["task"]: zoo / e["path"] for e in manifest["experts"]}, settings({}, "x"), "x")
    for e in manifest["experts"]:
        expert = transformers.AutoModel.from_pretrained(zoo / e["path"]).eval()
        rows.setdefault("individual", {})[e["task"]] = accuracy_table(Plain(expert), [t for t in tasks if t.name == e["task"]], dev)[e["task"]]
    rows[f"WE-MoE (init = TA {lam})"] = accuracy_table(model, tasks, dev)
    rows["oracle routing bound"] = oracle_accuracy(model, tasks, dev)
    for name, text in {
        f"task arithmetic ({lam})": project_text(zoo, manifest, "task_arithmetic", f"lambda = {lam}\nweight = 1.0"),
        "TIES (density 0.2, λ 1)": project_text(zoo, manifest, "ties", "density = 0.2\nlambda = 1.0\nweight = 1.0"),
    }.items():
        if "merges" not in wanted:
            break
        try:
            rows[name] = accuracy_table(Plain(merged_backbone(text, tmp / name.split()[0])), tasks, dev)
        except Exception as error:  # the merge plugin's parameter names may differ
            print(f"{name}: skipped ({error})", file=sys.stderr)
    stream = f'task_id_weight = {args.task_id_weight}\ntask_id_loss = "{args.task_id_loss}"'
    for key, name, method, params, extra in [
        ("entropy", "WE-MoE + TTA (entropy)", "we_moe", init, ""),
        ("we_moe", f"WE-MoE + TTA (entropy + task-stream {args.task_id_loss})", "we_moe", init, stream),
        ("sparse", "sparse WE-MoE 90% + TTA (+ task-stream)", "sparse_we_moe", f"tv_prune_ratio = 0.9\n{init}",
         stream),
        ("rank_one", "rank-one MoE (k 8) + TTA (+ task-stream)", "rank_one_moe", f"rank_k = 8\n{init}",
         stream),
    ]:
        if key not in wanted:
            continue
        m, record = build(project_text(zoo, manifest, method, params, tta + "\n" + extra), tmp, dev, True)
        rows[name] = record["accuracy"]
    if "pwe" in wanted:
        pwe_init = f"init_lambda = {lam}"  # pwe_moe routes attention by default
        pwe, record = build(project_text(zoo, manifest, "pwe_moe", pwe_init, f"max_steps = {args.steps}\nlr = {args.lr * 10}" + "\neval_grid_m = 2"),
                            tmp, dev, True)
        for row in record["front"]:
            best = row["preference"].index(max(row["preference"]))
            rows.setdefault("PWE-MoE LS (one-hot preference of the task)", {})[tasks[best].name] = row["accuracy"][tasks[best].name]
        plot_front(pwe, tasks, dev, Path("wemoe_pwe_front.png"))
    names = [t.name for t in tasks]
    mean_ind = sum(rows["individual"].values()) / len(names)
    print(f"{'method':48s}" + "".join(f"{n[:9]:>10s}" for n in names) + f"{'mean':>8s}{'% ind':>8s}")
    for label, accs in rows.items():
        vals = [accs.get(n) for n in names]
        mean = sum(v for v in vals if v is not None) / max(1, sum(v is not None for v in vals))
        print(f"{label:48s}" + "".join(f"{(v or 0) * 100:10.1f}" for v in vals) + f"{mean * 100:8.1f}{mean / mean_ind * 100:8.1f}")
    (tmp / "rows.json").write_text(json.dumps(rows, indent=2))


def plot_front(model, tasks, device, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mixcli_wemoe.diagnostics import accuracy

    n = model.config.num_experts
    fig, ax = plt.subplots(figsize=(7, 4))
    ts = [i / 10 for i in range(11)]
    for i, task in enumerate(tasks[:2]):  # the front between the first two tasks
        accs = []
        for t in ts:
            pref = [0.0] * n
            pref[0], pref[1] = 1 - t, t
            model.set_preference(pref)
            accs.append(accuracy(model, task, device))
        ax.plot(ts, accs, marker="o", label=task.name)
    ax.set_xlabel(f"preference weight on {tasks[1].name} (rest on {tasks[0].name})")
    ax.set_ylabel("accuracy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
