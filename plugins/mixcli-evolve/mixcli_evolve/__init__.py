"""mixcli-evolve: evolutionary search for merge recipes (`mixcli evolve PROJECT.toml`), in
parameter space (per-layer merge parameters) and data-flow space (layer paths). Importing
this package does not import torch."""

import mixcli

from . import strategies


def check_search(project, method, registry) -> None:
    """The [search] table, checked by `mixcli validate` (model configs only, no weight)."""
    from mixcli.core import prepare
    from mixcli.errors import MixcliError

    from .recipe import recipe_text
    from .search import plan_search

    plan = plan_search(project, method, registry)
    if plan.settings.space == "both":
        from .both import first_recipes

        firsts = first_recipes(plan)
    else:
        firsts = [plan.genome.decode(plan.genome.initial())]
    for first in firsts:
        if first is None:  # a layer path outside the length limits: nothing to plan
            continue
        try:  # the recipes the search writes plan like any project
            prepare(project.file.resolve().parent / "candidate.toml", recipe_text(first))
        except MixcliError as error:
            raise MixcliError(f"{project.where}: [search] the first candidate's recipe is invalid: {error}") from None


SECTION = mixcli.ProjectSection(name="search", summary="evolutionary recipe search (mixcli evolve)",
                                check=check_search)


@mixcli.hookimpl
def register_project_sections(register):
    register(SECTION)


@mixcli.hookimpl
def register_search_strategies(register):
    for strategy in strategies.STRATEGIES:
        register(strategy)


@mixcli.hookimpl
def register_commands(cli):
    from .command import evolve

    cli.add_command(evolve)


@mixcli.hookimpl
def register_upscalers(register):
    from . import dfs

    register(dfs.METHOD)


@mixcli.hookimpl
def register_architectures(register):
    from . import dfs_model  # imports transformers: only when mixcli loads a model

    dfs_model.register(register)
