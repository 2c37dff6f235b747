"""The end of a search: the best model written and measured on the report split
([[evaluation]]), the top recipes, and fitness against evaluations as a PNG."""

from __future__ import annotations

import json
from pathlib import Path

from .fitness import candidate, merge_recipe
from .recipe import BEST_MODEL, BEST_RECIPE, write_atomically

TOP = 5


def top_entries(entries: list[dict], count: int = TOP) -> list[dict]:
    """The best ``count`` distinct recipes, best first (the earliest of equal scores first)."""
    scored = [e for e in entries if not e.get("cached") and e["fitness"] is not None]
    return sorted(scored, key=lambda e: (-e["fitness"], e["evaluation"]))[:count]


def plot(entries: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [e for e in entries if not e.get("cached") and e["fitness"] is not None]
    xs = [e["evaluation"] for e in scored]
    ys = [e["fitness"] for e in scored]
    best, running = [], None
    for y in ys:
        running = y if running is None else max(running, y)
        best.append(running)
    figure, axes = plt.subplots(figsize=(6, 3.6))
    axes.scatter(xs, ys, s=10, alpha=0.5, label="candidate")
    axes.step(xs, best, where="post", color="C3", label="best so far")
    axes.set_xlabel("fitness evaluations")
    axes.set_ylabel("fitness")
    axes.set_title(title)
    axes.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def finish(outcome, plan, save: bool = True, show_progress: bool = True, say=None) -> dict:
    """Write the best model (unless ``save`` is false), evaluate it on the report split, show
    and write the report; returns it."""
    from mixcli.evaluation import render_results, run_evaluator
    from mixcli.progress import console

    from .run import fitness_setup

    out = console()
    folder = outcome.folder
    project = plan.project
    report = {"project": str(project.file), "evaluations": outcome.evaluations, "candidates": len(outcome.entries),
              "budget": plan.settings.budget, "best": None, "report": [], "top": []}
    if outcome.best is None:
        out.print("no candidate was scored", markup=False)
        return report
    best = outcome.best
    recipe = outcome.recipes[best["recipe"]]
    setup = fitness_setup(plan)
    rows = []

    def measure(folder: Path, model=None) -> None:
        models = {name: ref.resolved_path for name, ref in project.models.items()}
        for spec in project.evaluations:
            from mixcli.plugins import get_registry

            metrics = run_evaluator(get_registry().evaluators[spec.evaluator], folder, spec.params, spec.where,
                                    models, project.file.resolve().parent, plan.settings.device, model=model,
                                    show_progress=show_progress)
            rows.append({"model": str(folder), "evaluator": spec.evaluator, "metrics": metrics})

    if save:
        written = merge_recipe(recipe, project.file.resolve().parent, folder / BEST_MODEL, progress=show_progress,
                               force=True)
        out.print(f"[green]wrote[/] {written} (the best recipe, {folder / BEST_RECIPE})")
        measure(written)
    elif project.evaluations:
        with candidate(recipe, setup) as (name, model):
            measure(name, model)
    top = top_entries(outcome.entries)
    report.update(best={k: best[k] for k in ("evaluation", "recipe", "fitness", "metrics", "genotype")},
                  report=rows, top=[{k: e[k] for k in ("evaluation", "recipe", "fitness", "metrics")} for e in top])
    plotted = outcome.entries
    if outcome.phases:  # space = "both": each search's summary; the chart runs through both
        report["phases"] = {name: {"evaluations": phase.evaluations, "budget": plan.phases[n].settings.budget,
                                   "best": None if phase.best is None else
                                   {k: phase.best[k] for k in ("evaluation", "recipe", "fitness")}}
                            for n, (name, phase) in enumerate(outcome.phases.items())}
        first = outcome.phases["parameters"]
        plotted = first.entries + [dict(e, evaluation=e["evaluation"] + first.evaluations) for e in outcome.entries]
    write_atomically(folder / "report.json", json.dumps(report, indent=2, default=float) + "\n")
    plot(plotted, folder / "fitness.png", f"mixcli evolve {project.file.name}")

    from rich.table import Table

    title = f"top recipes ({outcome.evaluations} evaluations of {plan.settings.budget})"
    if outcome.phases:
        first = outcome.phases["parameters"].best
        title = (f"top recipes of the layer search ({outcome.evaluations} evaluations of {plan.settings.budget} in "
                 f"both searches; the parameter search's best: {first['fitness']:.4f})")
    table = Table(title=title)
    for column in ("rank", "evaluation", "fitness", "recipe", *[f"{t.evaluator} {t.metric}" for t in plan.settings.fitness]):
        table.add_column(column)
    for rank, entry in enumerate(top, 1):
        values = [f"{metrics.get(t.metric, float('nan')):.4f}" for t, metrics in zip(plan.settings.fitness, entry["metrics"])]
        table.add_row(str(rank), str(entry["evaluation"]), f"{entry['fitness']:.4f}", entry["recipe"], *values)
    out.print(table)
    if rows:
        render_results(rows, out)
    out.print(f"record {folder / 'record.jsonl'}, best recipe {folder / BEST_RECIPE}, chart {folder / 'fitness.png'}",
              markup=False)
    return report
