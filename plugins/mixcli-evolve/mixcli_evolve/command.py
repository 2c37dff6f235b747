"""`mixcli evolve PROJECT.toml`: search for the best recipe of a project's models."""

from __future__ import annotations

from pathlib import Path

import click

from mixcli.errors import MixcliError


@click.command()
@click.argument("project", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--resume", is_flag=True, help="Continue the search recorded in the output folder.")
@click.option("--no-save", is_flag=True, help="Do not write the best model at the end (its recipe is still written).")
@click.option("--no-progress", is_flag=True, help="No progress display.")
def evolve(project, resume, no_save, no_progress):
    """Search for the recipe of PROJECT's models that scores best on its [[search.fitness]]."""
    raise MixcliError(f"{project}: mixcli evolve is not available yet in this version")
