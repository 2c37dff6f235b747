"""mixcli-eval: evaluators for merged models. Importing this package does not import torch."""

import mixcli

from . import classification, exact_match, parameters, perplexity

MODULES = (parameters, perplexity, classification, exact_match)


@mixcli.hookimpl
def register_evaluators(register):
    for module in MODULES:
        register(module.EVALUATOR)
