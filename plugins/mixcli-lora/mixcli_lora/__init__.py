"""mixcli-lora: PEFT LoRA adapters as model inputs (``lora = "..."`` in [models], applied tensor
by tensor while merging) and ``mixcli extract-lora``. Importing this package does not import torch."""

import mixcli


def _has_lora(ref) -> bool:
    return bool(getattr(ref, "lora", None))


def _load(ref):
    from .apply import load

    return load(ref)


@mixcli.hookimpl
def register_model_loaders(register):
    register(mixcli.ModelLoader(
        name="lora",
        summary="a model with a PEFT LoRA adapter applied (lora = \"<adapter folder or Hub id>\"), "
                "computed tensor by tensor as PEFT's merge_and_unload would",
        accepts=_has_lora,
        load=_load,
    ))


@mixcli.hookimpl
def register_commands(cli):
    from .command import extract_lora

    cli.add_command(extract_lora)
