"""Quality of SMILE upscaling on the model zoo's vision tasks (prints a table, writes a heat map).

    python benchmarks/smile_quality.py [--zoo /work/zoo-shared/quick] [--gate-k 1,2,4,8,16,32,64]
        [--k 1,2,4,8,16,32,64,-1] [--heatmap smile_heatmap.png] [--max-ratio 2]

Rows: the base, each individual expert on its own task (and their mean), and SMILE for every
(gate_k, k) of the grid, each with its parameter count over the base's. The setting is chosen
on the validation split (the best mean validation accuracy among the cells within
``--max-ratio`` times the base's parameters) and reported on the test split; the heat map shows
the test accuracy over gate_k × k (validation in a second panel). Target (issue #17): SMILE at
least 90 % of the experts' mean accuracy with at most 2× the parameters. ``routed to own`` is the
share of (token, Linear) routing decisions of a task's images that pick that task's expert;
``oracle routing`` rows force every token of a task's images to its own expert (what perfect
routing would give with the same experts): together they show where the loss comes from.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch


def load_tasks(zoo: Path, manifest: dict, split: str) -> dict:
    from mixcli_eval.classification import read_task

    tasks = {}
    for entry in manifest["experts"]:
        name, weight, bias, images, labels, feature = read_task(zoo / entry["path"], 0, split)
        tasks[entry["task"]] = (weight, bias, images.reshape(len(images), 1, 8, 8), labels, feature)
    return tasks


def accuracies(model, tasks: dict) -> dict:
    from mixcli_eval.metrics import classification_accuracy

    return {name: classification_accuracy(model, w, b, x, y, feature=feature)
            for name, (w, b, x, y, feature) in tasks.items()}


def own_routing(model, tasks: dict, order: list) -> float:
    """Share of the routing decisions (top-1 expert per token and SMILE Linear) of each task's
    images that pick the task's own expert, averaged over the tasks."""
    from mixcli_smile.modeling import SmileLinear

    picks = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: picks.append(
        mod.routing_weights(inp[0].reshape(-1, mod.in_features)).argmax(-1))) for m in model.modules()
        if isinstance(m, SmileLinear)]
    shares = []
    try:
        with torch.no_grad():
            for name, (_, _, x, _, _) in tasks.items():
                picks.clear()
                model(pixel_values=x)
                decisions = torch.cat(picks)
                shares.append(float((decisions == order.index(name)).float().mean()))
    finally:
        for hook in hooks:
            hook.remove()
    return sum(shares) / len(shares)


def oracle_accuracies(model, tasks: dict, order: list) -> dict:
    """Accuracy with every token of a task's images forced to that task's expert: what perfect
    routing would give with these experts (an upper bound on the router's share of the loss)."""
    from mixcli_smile.modeling import SmileLinear

    layers = [m for m in model.modules() if isinstance(m, SmileLinear)]
    scores = {}
    for name, task in tasks.items():
        index = order.index(name)
        for layer in layers:
            layer.routing_weights = lambda flat, n=layer.num_experts: torch.nn.functional.one_hot(
                torch.full((flat.shape[0],), index, device=flat.device), n).float()
        scores.update(accuracies(model, {name: task}))
    for layer in layers:
        del layer.routing_weights  # back to the class's router
    return scores


def smile_model(zoo: Path, manifest: dict, folder: Path, gate_k: int, k: int):
    from mixcli.core import prepare
    from mixcli_smile.construction import model_from_plan

    models = "\n".join(f'{e["task"]} = "{zoo / e["path"]}"' for e in manifest["experts"])
    path = folder / f"smile-{gate_k}-{k}.toml"
    path.write_text(f'[models]\nbase = "{zoo / manifest["base"]}"\n{models}\n[method]\nname = "smile_upscaling"\n'
                    f'base = "base"\ngate_k = {gate_k}\nk = {k}\n[output]\npath = "out"\n')
    prepared = prepare(path)
    model = model_from_plan(prepared.plan)
    return model, sum(p.numel() for p in model.parameters())


def heatmap(grid: dict, gate_ks: list, ks: list, path: Path, chosen: tuple, ratios: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, split in zip(axes, ("test", "validation")):
        values = [[100 * grid[(g, k)][split] for k in ks] for g in gate_ks]
        image = ax.imshow(values, cmap="viridis", aspect="auto", origin="lower")
        for i, g in enumerate(gate_ks):
            for j, k in enumerate(ks):
                mark = "*" if (g, k) == chosen else ""
                ax.text(j, i, f"{values[i][j]:.1f}{mark}", ha="center", va="center", fontsize=7,
                        color="white" if values[i][j] < (max(map(max, values)) + min(map(min, values))) / 2 else "black")
        ax.set_xticks(range(len(ks)), [("dense" if k < 0 else str(k)) + f"\n{ratios[k]:.2f}x" for k in ks], fontsize=8)
        ax.set_yticks(range(len(gate_ks)), [str(g) for g in gate_ks])
        ax.set_xlabel("k (expert rank) / parameters over the base at gate_k = 1")
        ax.set_ylabel("gate_k (router rank)")
        ax.set_title(f"SMILE mean accuracy (%), {split} split (* = chosen on validation)")
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, default=Path("/work/zoo-shared/quick"))
    parser.add_argument("--gate-k", default="1,2,4,8,16,32,64")
    parser.add_argument("--k", default="1,2,4,8,16,32,64,-1")
    parser.add_argument("--max-ratio", type=float, default=2.0)
    parser.add_argument("--heatmap", type=Path, default=Path("smile_heatmap.png"))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import transformers

    from mixcli.plugins import register_architectures

    register_architectures()
    zoo = args.zoo
    manifest = json.loads((zoo / "vision" / "manifest.json").read_text())
    order = [e["task"] for e in manifest["experts"]]
    splits = {split: load_tasks(zoo, manifest, split) for split in ("validation", "test")}
    rows = []
    base = transformers.AutoModel.from_pretrained(zoo / manifest["base"]).eval()
    p_base = sum(p.numel() for p in base.parameters())
    rows.append(("base", {s: accuracies(base, t) for s, t in splits.items()}, 1.0, None))
    expert_scores = {"validation": {}, "test": {}}
    for entry in manifest["experts"]:
        model = transformers.AutoModel.from_pretrained(zoo / entry["path"]).eval()
        for split, tasks in splits.items():
            own = {entry["task"]: tasks[entry["task"]]}
            expert_scores[split].update(accuracies(model, own))
    rows.append(("individual experts", expert_scores, 1.0, None))
    gate_ks = [int(v) for v in args.gate_k.split(",")]
    ks = [int(v) for v in args.k.split(",")]
    grid, ratios, oracles = {}, {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for g in gate_ks:
            for k in ks:
                model, count = smile_model(zoo, manifest, Path(tmp), g, k)
                scores = {s: accuracies(model, t) for s, t in splits.items()}
                routed = own_routing(model, splits["test"], order)
                grid[(g, k)] = {s: sum(v.values()) / len(v) for s, v in scores.items()}
                grid[(g, k)]["ratio"], grid[(g, k)]["routed"] = count / p_base, routed
                ratios.setdefault(k, count / p_base)
                rows.append((f"smile gate_k {g} k {'dense' if k < 0 else k}", scores, count / p_base, routed))
                if g == gate_ks[0]:  # the router does not change the experts: one oracle row per k
                    oracle = {s: oracle_accuracies(model, t, order) for s, t in splits.items()}
                    oracles.append((f"oracle routing k {'dense' if k < 0 else k}", oracle, count / p_base, 1.0))
                print(f"  gate_k {g:3d} k {k:4d}: validation {100 * grid[(g, k)]['validation']:.1f} test "
                      f"{100 * grid[(g, k)]['test']:.1f} params {count / p_base:.2f}x routed-to-own {100 * routed:.1f}%",
                      file=sys.stderr, flush=True)
    mean = {s: sum(v.values()) / len(v) for s, v in expert_scores.items()}
    print(f"{'row':28s} {'val mean':>8s} {'test mean':>9s} {'params':>7s} {'routed to own':>13s}  per-task test")
    for name, scores, ratio, routed in rows + oracles:
        val, test = (sum(scores[s].values()) / len(scores[s]) for s in ("validation", "test"))
        per_task = " ".join(f"{t}={100 * scores['test'][t]:.1f}" for t in order)
        shown = "-" if routed is None else f"{100 * routed:.1f}%"
        print(f"{name:28s} {100 * val:8.1f} {100 * test:9.1f} {ratio:6.2f}x {shown:>13s}  {per_task}")
    within = [cell for cell, v in grid.items() if v["ratio"] <= args.max_ratio]
    if not within:
        print(f"no (gate_k, k) of the grid stays within {args.max_ratio}x the parameters")
        return
    chosen = max(within, key=lambda cell: (grid[cell]["validation"], -grid[cell]["ratio"]))
    best = grid[chosen]
    share = best["test"] / mean["test"]
    print(f"chosen on validation (<= {args.max_ratio}x parameters): gate_k {chosen[0]}, k {chosen[1]}: "
          f"test {100 * best['test']:.1f} vs experts' mean {100 * mean['test']:.1f} = {100 * share:.1f}% of it, "
          f"{best['ratio']:.2f}x the parameters (target >= 90% with <= 2x: {'met' if share >= 0.9 else 'NOT met'})")
    top = max(grid, key=lambda cell: grid[cell]["test"])
    print(f"best cell on the test split (for reference only, not a selection): gate_k {top[0]}, k {top[1]}: "
          f"test {100 * grid[top]['test']:.1f}, {grid[top]['ratio']:.2f}x")
    heatmap(grid, gate_ks, ks, args.heatmap, chosen, ratios)
    print(f"heat map: {args.heatmap.resolve()}")


if __name__ == "__main__":
    main()
