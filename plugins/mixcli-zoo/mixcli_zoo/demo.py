"""`mixcli demo`: build the zoo, run the demo projects, compare base, experts and merges.

Demo projects are the TOML files in ``examples/demo``, named ``<family>-<label>.toml``
(``vision-ties.toml``). They name zoo models by paths relative to themselves
(``../../zoo/vision/base``), so each also runs on its own with ``mixcli merge`` once the
zoo exists at ``zoo/``; the demo rewrites that prefix when the zoo lives elsewhere.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import click

ZOO_PREFIX = "../../zoo/"
# What each size runs: the projects (None: every one in examples/demo) and, for quick and tiny,
# shorter [tune] and [adapt] runs; every other setting is the project's own. The quick zoo's language
# task arithmetic and TIES fall below its base at the full zoo's λ, so quick shows its average
# and its MoE only.
RUNS = {
    "quick": {"projects": ("vision-average", "vision-task_arithmetic", "vision-ties", "vision-we_moe",
                           "language-average", "language-moe"),
              "steps": {"tune": ("steps", 200), "adapt": ("max_steps", 150)}},
    "full": {"projects": None, "steps": {}},
    "tiny": {"projects": None, "steps": {"tune": ("steps", 300), "adapt": ("max_steps", 100)}},
}


def family_evaluation(family: str, manifest: dict, root: Path, split: str = "test") -> tuple[str, dict, dict]:
    """(evaluator, settings for all tasks, settings per task) used for every row of a family,
    measuring the ``split`` data of each task: "test" (the tables) or "validation" (the split
    coefficients are chosen on)."""
    experts = {e["task"]: root / e["path"] for e in manifest["experts"]}
    if family == "vision":
        return ("classification", {"tasks": [str(p) for p in experts.values()], "split": split},
                {task: {"tasks": [str(p)], "split": split} for task, p in experts.items()})
    files = {task: str(root / manifest["data"][task][split]) for task in experts}
    return ("exact_match", {"tasks": files}, {task: {"tasks": {task: f}} for task, f in files.items()})


def build_in_parallel(root: Path, size: str, seed: int, families, console) -> None:
    """Build each family in its own process (the same seeded, one-thread training as in this
    one, so the same weights), relaying their log lines with the family in front."""
    import subprocess
    import sys
    import threading

    from mixcli.errors import MixcliError

    runs = []
    for family in families:
        command = [sys.executable, "-m", "mixcli_zoo.build", str(root), "--size", size, "--seed", str(seed),
                   "--families", family]
        env = dict(os.environ, MIXCLI_ZOO_THREADS="1", PYTHONUNBUFFERED="1")
        runs.append((family, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                              text=True, env=env)))

    def relay(family, process):
        for line in process.stdout:
            if line.strip() and not line.startswith("{"):  # the builder's closing JSON is for scripts
                console.print(f"[{family}] {line.rstrip()}", markup=False, highlight=False)

    relays = [threading.Thread(target=relay, args=run) for run in runs]
    for thread in relays:
        thread.start()
    for thread in relays:
        thread.join()
    for family, process in runs:
        if process.wait() != 0:
            raise MixcliError(f"building the {family} zoo failed (exit status {process.returncode}); "
                              "its output is above")


def _run_cli(*args: str) -> None:
    """``mixcli ARGS`` in this process, its output (progress bars included) shown as it comes."""
    from mixcli.cli import cli

    try:
        cli.main(list(args), prog_name="mixcli", standalone_mode=False)
    except click.ClickException as error:
        raise click.ClickException(f"mixcli {' '.join(args)}: {error.format_message()}") from None


def set_steps(text: str, section: str, key: str, value: int) -> str:
    """``text`` with ``key = <int>`` of the TOML table ``[section]`` set to ``value``."""
    table = re.search(rf"^\[{re.escape(section)}\]\s*$(.*?)(?=^\[|\Z)", text, re.M | re.S)
    if table is None:
        return text
    body = re.sub(rf"^{re.escape(key)}\s*=\s*\d+", f"{key} = {value}", table.group(1), count=1, flags=re.M)
    return text[:table.start(1)] + body + text[table.end(1):]


def render(project: Path, root: Path, folder: Path, steps: dict | None = None) -> Path:
    """A copy of a demo project whose zoo paths point at ``root``; ``steps`` maps a table to
    the (key, step count) it runs instead of its own (``{"tune": ("steps", 200)}``)."""
    text = project.read_text().replace(ZOO_PREFIX, root.resolve().as_posix() + "/")
    for section, (key, value) in (steps or {}).items():
        text = set_steps(text, section, key, value)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / project.name
    target.write_text(text)
    return target


def run_project(path: Path) -> Path:
    """Merge (and tune, when the project has [tune]); return the folder to evaluate."""
    from mixcli.core import load_project

    _run_cli("merge", str(path), "--force")
    project, _ = load_project(path)
    tune = project.sections.get("tune")
    if tune is not None:
        _run_cli("tune", str(path), "--force")
        output = tune.get("output")
        return (path.parent / output) if output else Path(str(project.output_path) + "-tuned")
    return project.output_path


def find_examples(explicit: Path | None) -> Path:
    candidates = [explicit] if explicit else [Path("examples/demo"), Path(__file__).resolve().parents[3] / "examples" / "demo"]
    for folder in candidates:
        if folder is not None and folder.is_dir():
            return folder
    raise click.ClickException("no examples/demo folder found; run from a mixcli checkout or pass --examples")


def table(family: str, rows: dict[str, dict]):
    from rich.table import Table

    tasks = [k for k in next(iter(rows.values())) if k != "mean"]
    metric = "accuracy" if family == "vision" else "exact match"
    out = Table(title=f"{family}: {metric} per task")
    out.add_column("model", overflow="fold")
    for task in tasks + ["mean"]:
        out.add_column(task, justify="right")
    for name, scores in rows.items():
        out.add_row(name, *(f"{scores.get(t, float('nan')):.3f}" for t in tasks + ["mean"]))
    return out


def chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, (family, rows) in zip(axes[0], results.items()):
        names = list(rows)
        ax.barh(names[::-1], [rows[n]["mean"] for n in names[::-1]], color="#4c72b0")
        ax.set_xlim(0, 1)
        ax.set_title(f"{family}: mean {'accuracy' if family == 'vision' else 'exact match'}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def evaluate(folder: Path, evaluator: str, settings: dict) -> dict:
    from mixcli.evaluation import run_evaluator
    from mixcli.plugins import get_registry

    return run_evaluator(get_registry().evaluators[evaluator], folder, dict(settings), f"demo: {evaluator}")


@click.command("demo")
@click.option("--size", type=click.Choice(list(RUNS)), default="quick", show_default=True,
              help="quick: a small zoo and six projects (minutes); full: the full zoo and every project "
                   "(about 50 minutes on 2 cores); tiny: the smallest zoo, for tests.")
@click.option("--root", type=click.Path(file_okay=False, path_type=Path),
              help="Where the model zoo is built and cached [default: zoo for full, zoo/SIZE otherwise].")
@click.option("--families", default="vision,language", show_default=True, help="Zoo families to run.")
@click.option("--examples", type=click.Path(file_okay=False, path_type=Path), help="Folder of demo projects.")
@click.option("--only", default="", help="Comma-separated demo project names to run (default: the size's).")
@click.option("--threads", type=click.IntRange(1), help="CPU threads for training the zoo [default: 2 for "
              "full, 1 otherwise]; a different count may change the low-order bits of the trained weights.")
@click.option("--seed", type=int, default=0, show_default=True)
def demo(size, root, families, examples, only, threads, seed):
    """Build the model zoo, run the demo projects and compare base, experts and merges."""
    from mixcli.progress import console as make_console

    from .build import build_zoo, check_replaceable

    console = make_console()  # in a log, the comparison table keeps its full task names
    started = time.time()
    root = root or (Path("zoo") if size == "full" else Path("zoo") / size)
    chosen = tuple(f for f in families.split(",") if f)
    check_replaceable(root, chosen)  # before any build process starts
    if size != "full" and len(chosen) > 1 and (os.cpu_count() or 1) > 1 and (threads or 1) == 1:
        build_in_parallel(root, size, seed, chosen, console)  # one-thread families, one core each
    manifests = build_zoo(root, size=size, seed=seed, families=chosen, log=console.print, threads=threads)
    examples = find_examples(examples)
    wanted = {name for name in only.split(",") if name} or set(RUNS[size]["projects"] or ())
    results: dict[str, dict[str, dict]] = {}
    for family, manifest in manifests.items():
        evaluator, every_task, per_task = family_evaluation(family, manifest, root)
        rows = {"base": evaluate(root / manifest["base"], evaluator, every_task)}
        individual = {}
        for expert in manifest["experts"]:
            task = expert["task"]
            individual[task] = evaluate(root / expert["path"], evaluator, per_task[task])[task]
        individual["mean"] = sum(individual.values()) / len(individual)
        rows["individual experts"] = individual
        if manifest.get("mlp_experts"):
            mlp = {e["task"]: evaluate(root / e["path"], evaluator, per_task[e["task"]])[e["task"]]
                   for e in manifest["mlp_experts"]}
            mlp["mean"] = sum(mlp.values()) / len(mlp)
            rows["individual experts (MLP-only)"] = mlp
        for project in sorted(examples.glob(f"{family}-*.toml")):
            label = project.stem[len(family) + 1:]
            if wanted and project.stem not in wanted:
                continue
            console.print(f"[bold]{project.stem}[/]")
            folder = run_project(render(project, root, root / "demo" / "projects", RUNS[size]["steps"]))
            rows[label] = evaluate(folder, evaluator, every_task)
        results[family] = rows
        console.print(table(family, rows))
    out = root / "demo"
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    chart(results, out / "results.png")
    console.print(f"results: {out / 'results.json'}, chart: {out / 'results.png'} "
                  f"({time.time() - started:.0f} s)")
