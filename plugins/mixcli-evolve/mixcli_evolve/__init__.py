"""mixcli-evolve: evolutionary search for merge recipes (`mixcli evolve PROJECT.toml`), in
parameter space (per-layer merge parameters) and data-flow space (layer paths). Importing
this package does not import torch."""

import mixcli


@mixcli.hookimpl
def register_commands(cli):
    from .command import evolve

    cli.add_command(evolve)
