"""`mixcli evolve PROJECT.toml`: search for the best recipe of a project's models."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument("project", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="The search's folder (overrides [output] path).")
@click.option("--resume", is_flag=True, help="Continue the search recorded in the output folder.")
@click.option("--force", is_flag=True, help="Start over in an output folder that holds a search record.")
@click.option("--no-save", is_flag=True, help="Do not write the best model at the end (best.toml is still written).")
@click.option("--no-progress", is_flag=True, help="No progress display.")
def evolve(project, out, resume, force, no_save, no_progress):
    """Search for the recipe of PROJECT's models that scores best on its [[search.fitness]].

    The search runs until [search] budget fitness evaluations are spent; Ctrl-C stops it after
    the current candidate (continue with --resume). The output folder ([output] path) gets the
    record, best.toml (a plain project: `mixcli merge` it) and, at the end, the best model."""
    from .report import finish
    from .run import evolve_project

    outcome, plan = evolve_project(project, resume=resume, force=force, show_progress=not no_progress, out=out)
    if outcome.stopped:
        from mixcli.progress import console

        from .both import PHASE_FOLDER

        best = outcome.folder / "best.toml"
        if outcome.phases and "layers" not in outcome.phases:  # space = "both", in its parameter search
            best = outcome.folder / PHASE_FOLDER / "best.toml"
        console(stderr=True).print(f"stopped after {outcome.evaluations} evaluations; the record and "
                                   f"{best} are intact: continue with "
                                   f"`mixcli evolve {project} --resume{f' --out {out}' if out else ''}`", soft_wrap=True, markup=False)
        click.get_current_context().exit(130)
    finish(outcome, plan, save=not no_save, show_progress=not no_progress)
