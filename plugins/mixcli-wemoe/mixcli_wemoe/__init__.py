"""mixcli-wemoe: weight-ensembling mixtures of experts for mixcli.

* ``we_moe``: WE-MoE (MLPs = pretrained MLP + routed task vectors);
* ``sparse_we_moe``: E-WEMoE (magnitude-pruned task vectors, one shared router);
* ``rank_one_moe``: experts are the top singular components of each task's MLP change;
* ``pwe_moe``: a router conditioned on a preference vector over the tasks (Pareto set).

Routers are trained by ``mixcli adapt`` or an ``[adapt]`` table (entropy minimisation for the
first three, labeled LS/EPO training for ``pwe_moe``). Outputs are safetensors plus a config
of ``model_type = "mixcli_wemoe"`` that transformers' ``AutoModel`` loads once this plugin is
installed. Importing this package does not import torch.
"""

import mixcli

from . import pwe_moe, rank_one_moe, sparse_we_moe, we_moe

__version__ = "0.1.0"
MODULES = (we_moe, sparse_we_moe, rank_one_moe, pwe_moe)


@mixcli.hookimpl
def register_upscalers(register):
    for module in MODULES:
        register(module.METHOD)


@mixcli.hookimpl
def register_architectures(register):
    from .modeling import register as register_model

    register_model(register)


@mixcli.hookimpl
def register_commands(cli):
    from .command import add_commands

    add_commands(cli)
