"""mixcli-moe: mixture-of-experts mixing for mixcli.

* ``moe_upcycle``: one dense Llama/Mistral becomes a Mixtral with identical experts;
* ``moe_merge``: N fine-tuned dense models sharing a base become one Mixtral, each model's
  MLP (and optionally q/k/v/o projections) one expert;
* ``mixcli tune PROJECT.toml``: trains the routers of the result (``[tune]`` table).

Outputs with attention-projection experts use the ``mixcli_mixllama`` architecture of
:mod:`mixcli_moe.modeling_mixllama`, registered with transformers' Auto classes through the
``register_architectures`` hook. Importing this package does not import torch.
"""

import mixcli

from . import moe_merge, moe_upcycle

__version__ = "0.1.0"
MODULES = (moe_upcycle, moe_merge)


@mixcli.hookimpl
def register_upscalers(register):
    for module in MODULES:
        register(module.METHOD)


@mixcli.hookimpl
def register_architectures(register):
    from .modeling_mixllama import MODEL_TYPE, MixLlamaConfig, MixLlamaForCausalLM

    register(MODEL_TYPE, MixLlamaConfig, {"AutoModelForCausalLM": MixLlamaForCausalLM})


@mixcli.hookimpl
def register_commands(cli):
    from .tune import tune_command

    cli.add_command(tune_command)
