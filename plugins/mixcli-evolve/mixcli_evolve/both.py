"""``space = "both"``: Sakana's PS+DFS recipe (spec §3.1) in one run: a parameter-space search,
then a data-flow-space search over its best model and the searched models.

The budget is split (:func:`mixcli_evolve.settings.phase_budgets`): the parameter search gets
⌊budget · both_split⌋ evaluations (half by default), the layer search the rest, each at least
one. The parameter search runs in ``<out>/stage-parameters/`` as an ordinary search folder
(record, best.toml) and its best model is written once into ``<out>/stage-parameters/model/``;
the layer search runs in ``<out>`` itself over that model (named ``parameters``, laid out first,
so the layer search starts from it) followed by the searched models. Each record's header names
its phase; the layer record's also the parameter budget its sources came from. ``<out>/best.toml``
is the layer search's best as a plain project, with two ``[[stage]]`` tables when its path uses
the parameter search's model: that model's recipe, then the layer path over it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from mixcli.errors import MixcliError

from .genome import Genome
from .paths import PathGenome
from .recipe import BEST_MODEL, recipe_text, skeleton
from .search import RECORD, Outcome, SearchPlan, prepare_folder, read_record, run
from .settings import PS_MODEL, SearchSettings, phase_budgets, population_size

PHASE_FOLDER = "stage-parameters"  # the parameter search's folder inside the search's folder
LAYER_STAGE = "layers"


@dataclass
class BothPlan:
    """A checked ``space = "both"`` [search]: the two searches it runs, in order."""

    project: object
    method: object
    settings: SearchSettings  # the whole search: space "both", the total budget
    parameters: SearchPlan
    layers: SearchPlan

    @property
    def phases(self) -> tuple[SearchPlan, SearchPlan]:
        return self.parameters, self.layers


def parameter_model(project) -> Path:
    """Where the parameter search's best model is written: inside the search's own folder."""
    out = Path(project.output_path) if project.output_path is not None else project.file.resolve().parent / "out"
    return out.absolute() / PHASE_FOLDER / BEST_MODEL


def plan_both(project, method, registry, settings: SearchSettings) -> BothPlan:
    """Both searches' settings, genomes and populations; reads model configs only."""
    from mixcli.core import open_model

    first_budget, second_budget = phase_budgets(settings)
    layers = {}
    for name in settings.models + ([settings.base] if settings.base and settings.base not in settings.models else []):
        layers[name] = open_model(project.models[name], registry).num_layers
        if layers[name] is None:
            raise MixcliError(f"{project.models[name].where}: the model has no layer count in its config.json, "
                              "so the search cannot lay out its layers")
    if len(set(layers.values())) != 1:
        counts = ", ".join(f"'{name}' {count}" for name, count in layers.items())
        raise MixcliError(f"{settings.where}: the searched models need the same number of layers ({counts})")
    count = next(iter(layers.values()))
    ps_settings = replace(settings, space="parameters", budget=first_budget)
    genome = Genome(ps_settings, count, skeleton(project, method, ps_settings))
    parameters = SearchPlan(project, method, ps_settings, genome, population_size(ps_settings, genome.dimension),
                            phase={"phase": "parameters", "of": "both"})
    sources = skeleton(project, method, replace(settings, space="layers"))["models"]
    dfs_settings = replace(settings, space="layers", models=[PS_MODEL, *settings.models], budget=second_budget)
    paths = {PS_MODEL: str(parameter_model(project)), **{name: sources[name]["path"] for name in settings.models}}
    path_genome = PathGenome(dfs_settings, {PS_MODEL: count, **layers}, paths)
    layer_plan = SearchPlan(project, method, dfs_settings, path_genome,
                            population_size(dfs_settings, path_genome.dimension),
                            phase={"phase": "layers", "of": "both", "parameters_budget": first_budget})
    return BothPlan(project, method, settings, parameters, layer_plan)


def first_recipes(plan: BothPlan) -> list[dict]:
    """The first candidate of each search, to plan at validation: the layer search's with a
    source model standing in for the parameter search's model (same architecture, not yet built)."""
    recipes = [plan.parameters.genome.decode(plan.parameters.genome.initial())]
    path = plan.layers.genome.decode(plan.layers.genome.initial())
    if path is not None:
        stand_in = plan.layers.genome.models[plan.settings.models[0]]
        models = {name: stand_in if name == PS_MODEL else value for name, value in path["models"].items()}
        recipes.append(dict(path, models=models))
    return recipes


def staged_recipe(parameter_recipe: dict):
    """``render`` for the layer search's best.toml: a path over the parameter search's model is
    a two-stage project (that model's recipe, then the path), any other path a plain project."""

    def render(recipe: dict, note: str = "") -> str:
        if PS_MODEL not in recipe["models"]:
            return recipe_text(recipe, note)
        first = dict(parameter_recipe, output=dict(parameter_recipe.get("output", {}), path=f"stages/{PS_MODEL}"))
        second = dict(recipe, models={name: PS_MODEL if name == PS_MODEL else value
                                      for name, value in recipe["models"].items()})
        return recipe_text({"stage": [{"name": PS_MODEL, **first}, {"name": LAYER_STAGE, **second}]}, note)

    return render


def evolve_both(plan: BothPlan, folder: Path, executor, setup, resume: bool, force: bool, progress=None,
                say=print) -> Outcome:
    """Run (or continue) both searches; the outcome is the layer search's, with both phases'."""
    from .fitness import merge_recipe

    inner = folder / PHASE_FOLDER
    layer_replay = prepare_folder(folder, plan.layers, resume, force)  # first: checks the whole folder
    fresh_inner = resume and read_record(inner)[0] is None and not layer_replay  # killed before it began
    parameter_replay = prepare_folder(inner, plan.parameters, resume and not fresh_inner, True)

    def phase(offset: int):
        if progress is None:
            return None
        return lambda entry, best, generation: progress(dict(entry, evaluation=entry["evaluation"] + offset),
                                                        best, generation)

    first = run(plan.parameters, inner, executor, setup, parameter_replay, progress=phase(0), say=say)
    if first.stopped:
        return Outcome(first.entries, first.best, True, first.evaluations, folder, first.recipes,
                       phases={"parameters": first})
    if first.best is None:
        raise MixcliError(f"{inner / RECORD}: the parameter search scored no candidate, so the layer search has "
                          "no model to start from; check the fitness on a plain parameter search")
    if first.evaluations != plan.parameters.settings.budget:
        raise MixcliError(f"{inner / RECORD}: the parameter search ended after {first.evaluations} of its "
                          f"{plan.parameters.settings.budget} evaluations; start again with --force")
    parameter_recipe = first.recipes[first.best["recipe"]]
    # written on every run (resume too): the same recipe gives the same bits, and a kill while it was
    # written leaves nothing half-done for the layer search to read
    merge_recipe(parameter_recipe, plan.project.file.resolve().parent, inner / BEST_MODEL, progress=False, force=True)
    second = run(plan.layers, folder, executor, setup, layer_replay, progress=phase(first.evaluations), say=say,
                 render=staged_recipe(parameter_recipe))
    return Outcome(second.entries, second.best, second.stopped, first.evaluations + second.evaluations, folder,
                   second.recipes, phases={"parameters": first, "layers": second})
