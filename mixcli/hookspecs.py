"""The hooks a mixcli plugin implements.

Each hook receives a ``register`` callback (or the CLI group) and calls it once per thing it
provides. Implement them with ``@mixcli.hookimpl`` in a module named by a ``mixcli`` entry
point of your distribution; see README, "Writing a plugin".
"""

import pluggy

hookspec = pluggy.HookspecMarker("mixcli")
hookimpl = pluggy.HookimplMarker("mixcli")


@hookspec
def register_model_loaders(register):
    """Called once when the registry is built. Call ``register(loader)`` with a
    :class:`mixcli.ModelLoader` for each kind of model reference you can open."""


@hookspec
def register_merge_methods(register):
    """Called once when the registry is built. Call ``register(method)`` with a
    :class:`mixcli.MergeMethod` for each tensor-wise merge you provide."""


@hookspec
def register_upscalers(register):
    """Called once when the registry is built. Call ``register(upscaler)`` with a
    :class:`mixcli.Upscaler` for each method that builds a new architecture."""


@hookspec
def register_evaluators(register):
    """Called once when the registry is built. Call ``register(evaluator)`` with a
    :class:`mixcli.Evaluator` for each way of measuring a model."""


@hookspec
def register_architectures(register):
    """Called before mixcli loads a model with transformers. Call
    ``register(model_type, config_class, auto_classes)`` for each model class you provide
    that stock transformers lacks; ``auto_classes`` maps an Auto class name such as
    ``"AutoModelForCausalLM"`` to your model class."""


@hookspec
def register_architecture_layouts(register):
    """Called once when the registry is built. Call ``register(layout)`` with a
    :class:`mixcli.ArchitectureLayout` for each family of model types whose tensor names and
    per-layer config fields you describe; it is used for models whose ``model_type`` it lists
    (before the built-in fallback)."""


@hookspec
def register_project_sections(register):
    """Called once when the registry is built. Call ``register(section)`` with a
    :class:`mixcli.ProjectSection` for each top-level project table your commands read (whatever
    the method); ``mixcli validate`` runs its check before any weight is read."""


@hookspec
def register_search_strategies(register):
    """Called once when the registry is built. Call ``register(strategy)`` with a
    :class:`mixcli.SearchStrategy` for each optimiser a recipe search (``mixcli evolve``) can
    use, chosen by ``[search] strategy``."""


@hookspec
def register_commands(cli):
    """Called when the CLI starts. Add click commands to the ``cli`` group."""
