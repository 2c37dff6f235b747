"""One `mixcli evolve` run: the project checked, its folder prepared, the executor started,
the search driven with a progress display."""

from __future__ import annotations

import time
from pathlib import Path

from mixcli.errors import MixcliError

from .executors import make_executor
from .fitness import FitnessSetup
from .search import plan_search, prepare_folder, run


def load(path: Path, out: Path | None = None):
    from mixcli.core import load_project
    from mixcli.plugins import get_registry

    registry = get_registry()
    project, method = load_project(path, registry)
    if out is not None:
        project.output_path = Path(out)
    if "search" not in project.sections:
        raise MixcliError(f"{project.where}: no [search] table; add one with a budget and [[search.fitness]] "
                          "(see README, \"Evolutionary recipe search\")")
    if project.output_path is None:
        raise MixcliError(f"{project.where}: no output path; add [output] path = \"...\", the folder the search "
                          "writes its record, best recipe and best model into")
    return project, method, registry, plan_search(project, method, registry)


def fitness_setup(plan) -> FitnessSetup:
    from mixcli.core import open_models
    from mixcli.plugins import get_registry

    from .fitness import scoring_threads

    project = plan.project
    threads = scoring_threads(plan.settings.threads, open_models(project, get_registry()).values())
    return FitnessSetup(plan.settings.fitness, {name: ref.resolved_path for name, ref in project.models.items()},
                        project.file.resolve().parent, plan.settings.device, threads)


def evolve_project(path: Path, resume: bool = False, force: bool = False, show_progress: bool = True, say=None,
                   out: Path | None = None):
    """Run (or continue) the search of the project at ``path``; returns (outcome, plan)."""
    from mixcli.progress import console, progress

    project, method, registry, plan = load(Path(path), out)
    folder = Path(project.output_path)
    both = plan.settings.space == "both"
    replay = None if both else prepare_folder(folder, plan, resume, force)
    settings = plan.settings
    say = say or (lambda text: console(stderr=True).print(text, soft_wrap=True, markup=False))
    if show_progress:
        phases = plan.phases if both else (plan,)
        say(f"evolving {project.where}: " + ", then ".join(
            f"{p.settings.space} space, {p.genome.dimension} genes, population {p.popsize}, budget "
            f"{p.settings.budget} evaluations" for p in phases) + f", {settings.executor} executor")
    setup = fitness_setup(plan)
    bar = progress("evolving", settings.budget, "evaluations", enabled=show_progress)
    started = time.monotonic()

    def update(entry, best, generation):
        done = entry["evaluation"]
        fields = {"generation": generation + 1}
        if best is not None:
            fields["best"] = best["fitness"]
        bar.advance(done - bar.done, **fields)

    executor = make_executor(settings, setup)
    try:
        with bar:
            if both:
                from .both import evolve_both

                outcome = evolve_both(plan, folder, executor, setup, resume, force, progress=update, say=say)
            else:
                outcome = run(plan, folder, executor, setup, replay, progress=update, say=say)
    finally:
        executor.close()
    outcome.seconds = time.monotonic() - started
    return outcome, plan
