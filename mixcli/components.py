"""What plugins register: model loaders, merge methods, upscalers, evaluators, project
sections and search strategies.

Each is a small frozen record of a name, a one-line summary, a typed parameter dataclass
(see :mod:`mixcli.params`) and the function that does the work. None of this imports
torch, so ``mixcli list-methods`` stays fast.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Literal

from .params import ParamSpec, param_specs


TEMPLATE_NOTE = """A method's ``example`` values may name the template's models: ``base`` (when the
method takes one), then ``first``, ``second``, ``third``... (see :mod:`mixcli.template`); in a
per-model parameter's example, ``{model}`` stands for each model's own name."""


@dataclasses.dataclass(frozen=True)
class MergeMethod:
    """A tensor-wise merge: each output tensor is a pure function of same-named inputs.

    ``merge(tensors, base, **params)`` receives the non-base input tensors (all inputs when
    ``base == "ignored"``), the base tensor or ``None``, shared parameters as scalars and
    per-model parameters as lists aligned with ``tensors``; random methods also get
    ``seed`` (an int derived from the project seed and the tensor name). It returns the
    merged tensor. The engine aligns input dtypes beforehand and casts the result after.
    """

    name: str
    summary: str
    merge: Callable[..., Any]
    params: type | None = None
    base: Literal["required", "optional", "ignored"] = "required"
    min_inputs: int = 1  # non-base inputs (all inputs when the base is ignored)
    max_inputs: int | None = None
    random: bool = False
    # when only some inputs hold an optional tensor (a separate lm_head in tied models):
    # "merge" merges those that have it, "singleton" copies it if exactly one has it,
    # "base_or_skip" copies the base's or leaves the tensor out
    partial_tensors: Literal["merge", "singleton", "base_or_skip"] = "merge"
    # called at planning time with one tensor's resolved parameters (as ``merge`` gets them,
    # without tensors); raises MixcliError for values that cannot work, e.g. weights summing to 0
    check: Callable[..., None] | None = None
    # ``merge`` takes ``out=``, a tensor of the result's shape and the inputs' dtype, fills it
    # and returns it: the engine then computes straight into the output file
    accepts_out: bool = False
    # parameter values ``mixcli init`` writes into the template: a starting point that validates
    # and merges on models of a suitable architecture (see :data:`TEMPLATE_NOTE`)
    example: dict = dataclasses.field(default_factory=dict)
    # parameters this method does not take that recipes for similar methods carry, each with
    # what to do instead: the error for such a parameter says so (e.g. sce and ``weight``)
    param_hints: dict[str, str] = dataclasses.field(default_factory=dict, hash=False)
    # ``merge`` takes ``name=``, the output tensor's name (for exact-name parameters)
    wants_name: bool = False
    # ``merge`` runs large linear algebra (SVDs): the engine gives a large matrix all cores,
    # one tensor at a time, instead of one core per tensor
    linear_algebra: bool = False
    # ``working_memory(shape, inputs) -> bytes`` the merge holds beyond its mapped inputs;
    # the engine's memory budget uses it instead of its estimate for elementwise methods
    working_memory: Callable[[tuple, int], int] | None = None
    kind: str = "merge"

    @property
    def param_specs(self) -> dict[str, ParamSpec]:
        return param_specs(self.params)


@dataclasses.dataclass(frozen=True)
class Upscaler:
    """A method that builds a new architecture (depth upscaling, MoE upcycling, ...).

    ``build(context)`` receives a :class:`mixcli.plan.BuildContext` (the loaded models,
    resolved parameters, seed, device) and returns a :class:`mixcli.plan.OutputPlan`: the
    output config, the output tensors each with a function computing it on demand, and any
    extra files. The streaming engine writes that plan exactly like a merge.
    """

    name: str
    summary: str
    build: Callable[[Any], Any]
    params: type | None = None
    min_inputs: int = 1
    max_inputs: int | None = None
    # extra top-level tables of the project this method reads (e.g. "tune"); they reach
    # build() as context.sections and are errors in projects of other methods
    sections: tuple[str, ...] = ()
    # when a later command writes the project's final model (e.g. ``mixcli tune``):
    # ``final_output(project)`` returns (its folder, the command that writes it), or None when
    # the merge output is final; ``mixcli eval PROJECT`` evaluates that folder
    final_output: Callable[[Any], tuple[Any, str] | None] | None = None
    # whether the project names a base model under [method] base (min/max_inputs count it)
    base: Literal["required", "optional", "ignored"] = "ignored"
    example: dict = dataclasses.field(default_factory=dict)  # as for MergeMethod
    kind: str = "upscale"

    @property
    def param_specs(self) -> dict[str, ParamSpec]:
        return param_specs(self.params)


@dataclasses.dataclass(frozen=True)
class Evaluator:
    """Measures a model: ``evaluate(context) -> dict[str, float]``.

    ``context`` is a :class:`mixcli.evaluation.EvalContext`: the model folder (or a resident
    model: get it with ``context.load_model``), the evaluator's resolved parameters, the
    project's models (for per-task heads) and the device. Returned metric names become columns of the results table and keys of the
    results JSON.
    """

    name: str
    summary: str
    evaluate: Callable[[Any], dict]
    params: type | None = None
    # the metrics it returns, each "higher" or "lower" (which way is better); "*" stands for
    # names that vary (one per task): a search's fitness may only use metrics declared here
    metrics: dict[str, str] = dataclasses.field(default_factory=dict, hash=False)
    kind: str = "evaluator"

    @property
    def param_specs(self) -> dict[str, ParamSpec]:
        return param_specs(self.params)


@dataclasses.dataclass(frozen=True)
class ModelLoader:
    """Turns a model reference from the project into a :class:`mixcli.checkpoint.Checkpoint`.

    ``accepts(ref)`` says whether this loader handles a :class:`mixcli.project.ModelRef`
    (loaders registered by later plugins are asked first); ``load(ref)`` returns the
    checkpoint: its config and lazily readable tensors. Loading must not read tensor data.
    """

    name: str
    summary: str
    accepts: Callable[[Any], bool]
    load: Callable[[Any], Any]
    kind: str = "loader"


@dataclasses.dataclass(frozen=True)
class ProjectSection:
    """A top-level table any project may carry, read by a plugin's command (``[search]`` for
    ``mixcli evolve``) rather than by the method.

    ``check(project, method, registry)`` is called by :func:`mixcli.project.check` (so by
    ``mixcli validate``) after the method and its parameters are checked and before any weight
    is read; it raises :class:`mixcli.MixcliError` for a mistake in the table.
    """

    name: str
    summary: str
    check: Callable[[Any, Any, Any], None]
    kind: str = "section"


@dataclasses.dataclass(frozen=True)
class SearchStrategy:
    """A black-box optimiser for recipe search, driven by ask and tell.

    ``create(x0, sigma0, popsize, seed, binary)`` returns an object with ``ask() -> list of
    genotypes`` (one generation, each a list of floats), ``tell(genotypes, losses)`` (lower is
    better, one loss per asked genotype, in order) and ``popsize``; ``binary`` lists the gene
    indices that are on/off switches (DFS indicators), which a strategy may treat as discrete.
    The same seed and the same losses must give the same genotypes.
    """

    name: str
    summary: str
    create: Callable[..., Any]
    kind: str = "strategy"
