"""mixcli-smile: methods built on the singular subspaces of pretrained weights and task
vectors (the SMILE paper's family).

* ``smile_upscaling``: every Linear becomes the pretrained weight plus routed low-rank
  task-vector experts (no data, no training); saved as safetensors plus a config of
  ``model_type = "smile_<type>"`` that transformers' Auto classes load once this plugin is
  installed;
* ``singular_projection_merging``: a fine-tune's Linear changes projected onto the pretrained
  weights' singular subspaces (a plain model).

Importing this package does not import torch.
"""

import mixcli

from . import singular_projection_merging, smile_upscaling

__version__ = "0.1.0"
MODULES = (singular_projection_merging,)
UPSCALERS = (smile_upscaling,)


@mixcli.hookimpl
def register_merge_methods(register):
    for module in MODULES:
        register(module.METHOD)


@mixcli.hookimpl
def register_upscalers(register):
    for module in UPSCALERS:
        register(module.METHOD)


@mixcli.hookimpl
def register_architectures(register):
    from .modeling import register as register_models

    register_models(register)
