"""Offline model zoo for mixcli: tiny ViT and tiny Llama families trained locally, and the
`mixcli demo` command. Importing this package does not import torch."""

import mixcli


def build_zoo(*args, **kwargs):
    from .build import build_zoo as build

    return build(*args, **kwargs)


def build_char_tokenizer(alphabet: str):
    from .tokenizer import build_char_tokenizer as build

    return build(alphabet)


@mixcli.hookimpl
def register_commands(cli):
    from .demo import demo

    cli.add_command(demo)


__all__ = ["build_zoo", "build_char_tokenizer"]
