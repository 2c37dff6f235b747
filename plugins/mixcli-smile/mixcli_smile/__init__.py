"""mixcli-smile: methods built on the singular subspaces of pretrained weights and task
vectors (the SMILE paper's family). Importing this package does not import torch."""

import mixcli

from . import singular_projection_merging

MODULES = (singular_projection_merging,)


@mixcli.hookimpl
def register_merge_methods(register):
    for module in MODULES:
        register(module.METHOD)
