"""The ``[search]`` table of a project: what `mixcli evolve` searches, how, and against which
fitness. Parsed and checked without reading a weight (``mixcli validate`` runs it)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from mixcli.errors import MixcliError, closest

SPACES = ("parameters", "layers", "both")
EXECUTORS = ("serial", "process", "ray")
SCALES = ("none", "pair", "matrix")
DTYPES = ("float32", "float16", "bfloat16")
# mergekit-evolve's genome: the genes of each model, per method (spec §2.1); other tensor-wise
# methods with a per-model weight get (weight) or (weight, density), as ties does
GENES = {"linear": ("weight",), "task_arithmetic": ("weight",), "ties": ("weight", "density"),
         "dare_ties": ("weight", "density"), "slerp": ("t",)}
NORMALIZED = ("ties", "dare_ties", "linear")  # normalize defaults to true for these (mergekit)
KEYS = ("space", "models", "layer_granularity", "normalize", "allow_negative_weights", "filters", "smooth",
        "random_init", "dtype", "sigma0", "popsize", "budget", "seed", "strategy", "executor", "workers",
        "ray_address", "device", "fitness", "allow_test_split", "repeats", "min_path_length", "max_path_length",
        "scales", "embed_from", "head_from", "both_split", "threads")
PS_MODEL = "parameters"  # space = "both": the layer phase's name for the parameter phase's best model
FITNESS_KEYS = ("evaluator", "metric", "weight")
_TEST_WORD = re.compile(r"(^|[^a-z])test([^a-z]|$)")


@dataclass
class FitnessTerm:
    """``weight · value`` of one metric of one evaluator, sign-adjusted so that higher is better."""

    evaluator: str
    metric: str
    weight: float
    params: dict
    where: str
    higher_is_better: bool = True


@dataclass
class SearchSettings:
    space: str
    models: list[str]  # the genome's models ([method] base excluded unless listed)
    base: str | None
    method: str
    genes: tuple[str, ...]
    layer_granularity: int
    normalize: bool
    allow_negative_weights: bool
    filters: list[str]
    smooth: bool
    random_init: bool
    dtype: str
    sigma0: float
    popsize: int | None
    budget: int
    seed: int
    strategy: str
    executor: str
    workers: int
    ray_address: str | None
    device: str
    fitness: list[FitnessTerm]
    allow_test_split: bool
    repeats: int
    min_path_length: int
    max_path_length: int | None
    scales: str
    embed_from: str | None
    head_from: str | None
    both_split: float = 0.5  # space = "both": the parameter phase's share of the budget
    threads: int = 0  # torch threads while a candidate is scored; 0: chosen from the models' size
    where: str = "[search]"
    extra: dict = field(default_factory=dict)


def _bool(table: dict, key: str, default: bool, where: str) -> bool:
    value = table.get(key, default)
    if not isinstance(value, bool):
        raise MixcliError(f"{where} {key} must be true or false, got {value!r}")
    return value


def _int(table: dict, key: str, default, where: str, low: int) -> int | None:
    value = table.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise MixcliError(f"{where} {key} must be a whole number >= {low}, got {value!r}")
    return value


def _choice(table: dict, key: str, default: str, choices: tuple, where: str) -> str:
    value = table.get(key, default)
    if value not in choices:
        raise MixcliError(f"{where} {key} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}"
                          + closest(str(value), choices))
    return value


def parse_search(project, method, registry) -> SearchSettings:
    """The project's [search] table, checked against its models, method and the registry."""
    from mixcli.components import MergeMethod

    name = project.where
    where = f"{name}: [search]"
    table = project.sections.get("search")
    if table is None:
        raise MixcliError(f"{name}: no [search] table; add one with a budget and [[search.fitness]] "
                          "(see README, \"Evolutionary recipe search\")")
    for key in table:
        if key not in KEYS:
            raise MixcliError(f"{where}: unknown key '{key}'{closest(key, KEYS)}")
    space = _choice(table, "space", "parameters", SPACES, where)
    if "budget" not in table:
        raise MixcliError(f"{where} budget is missing; give the most fitness evaluations the search may "
                          "use, e.g. budget = 100")
    budget = table["budget"]
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise MixcliError(f"{where} budget must be a whole number of evaluations >= 1, got {budget!r}")

    both_split = _both_split(table, space, budget, where)
    if space == "both" and PS_MODEL in project.models:
        raise MixcliError(f"{project.models[PS_MODEL].where}: the name '{PS_MODEL}' is what space = \"both\" "
                          "calls the parameter search's model in the layer search; rename this model")
    models = table.get("models")
    if models is None:
        models = [m for m in project.models if m != project.base]
    elif not isinstance(models, list) or not models or not all(isinstance(m, str) for m in models):
        raise MixcliError(f"{where} models must be a non-empty list of model names from [models]")
    for model in models:
        if model not in project.models:
            raise MixcliError(f"{where} models: no model named '{model}' in [models]{closest(model, project.models)}")
    if len(set(models)) != len(models):
        raise MixcliError(f"{where} models lists a model twice")
    if not models:
        raise MixcliError(f"{where}: no model to search over besides the base; list them in [models]")

    genes: tuple[str, ...] = ()
    if space in ("parameters", "both"):
        if not isinstance(method, MergeMethod):
            raise MixcliError(f"{name}: [method] '{project.method}' is not a tensor-wise merge; a parameter-space "
                              "search ([search] space = \"parameters\") needs one, e.g. ties or linear")
        specs = method.param_specs
        genes = GENES.get(method.name) or tuple(g for g in ("weight", "density")
                                                 if g in specs and specs[g].per_model)
        if "weight" not in genes and "t" not in genes:
            raise MixcliError(f"{name}: [method] '{method.name}' has no per-model weight for the search to set; "
                              "use linear, task_arithmetic, ties, dare_ties or slerp")
        if project.slices is not None:
            raise MixcliError(f"{name}: [[slices]] are what the search writes; remove them from the project")
        if project.overrides:
            raise MixcliError(f"{project.overrides[0].where}: per-tensor overrides are not searched; remove "
                              "them, or use [search] filters for per-tensor genes")
    filters = table.get("filters", [])
    if not isinstance(filters, list) or not all(isinstance(f, str) and f for f in filters):
        raise MixcliError(f"{where} filters must be a list of tensor-name substrings, e.g. [\"self_attn\", \"mlp\"]")
    smooth = _bool(table, "smooth", False, where)
    default_normalize = method.name in NORMALIZED
    normalize = _bool(table, "normalize", default_normalize, where)
    if method.name == "slerp" and space != "layers":
        if filters or smooth:
            raise MixcliError(f"{where}: slerp takes no filters and no smooth = true (mergekit's slerp genome "
                              "picks two models per layer group)")
        if len(models) < 2:
            raise MixcliError(f"{where}: slerp needs at least two models to pick from, got {len(models)}")
        if project.base is not None and project.base not in models:
            raise MixcliError(f"{name}: [method] base '{project.base}' is not among the searched models; a slerp "
                              "search picks its base per layer group, so remove [method] base")

    sigma0 = table.get("sigma0", 1 / 6)
    if isinstance(sigma0, bool) or not isinstance(sigma0, (int, float)) or not (sigma0 > 0 and math.isfinite(sigma0)):
        raise MixcliError(f"{where} sigma0 must be a number > 0, got {sigma0!r}")
    strategy = table.get("strategy", "cma")
    if strategy not in registry.strategies:
        raise MixcliError(f"{where} strategy: unknown search strategy {strategy!r}{closest(str(strategy), registry.strategies)}"
                          f"; known: {', '.join(sorted(registry.strategies))}")
    executor = _choice(table, "executor", "serial", EXECUTORS, where)
    if executor == "ray":
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            raise MixcliError(f"{where} executor = \"ray\" needs Ray: pip install \"mixcli-evolve[ray]\"")
    device = table.get("device", project.device)
    from mixcli.project import check_device

    device = check_device(device, f"{where} device")
    ray_address = table.get("ray_address")
    if ray_address is not None and not (isinstance(ray_address, str) and ray_address):
        raise MixcliError(f"{where} ray_address must be a Ray address such as \"auto\" or \"ray://host:10001\"")
    allow_test = _bool(table, "allow_test_split", False, where)

    def model_or_none(key: str) -> str | None:
        value = table.get(key)
        if value is not None and value not in project.models:
            raise MixcliError(f"{where} {key}: no model named {value!r} in [models]{closest(str(value), project.models)}")
        return value

    settings = SearchSettings(
        space=space, models=list(models), base=project.base, method=method.name, genes=genes,
        layer_granularity=_int(table, "layer_granularity", 0, where, 0), normalize=normalize,
        allow_negative_weights=_bool(table, "allow_negative_weights", False, where), filters=list(filters),
        smooth=smooth, random_init=_bool(table, "random_init", False, where),
        dtype=_choice(table, "dtype", project.dtype or "bfloat16", DTYPES, where), sigma0=float(sigma0),
        popsize=_int(table, "popsize", None, where, 4), budget=budget, seed=_int(table, "seed", project.seed, where, 0),
        strategy=strategy, executor=executor, workers=_int(table, "workers", 2 if executor != "serial" else 1, where, 1),
        ray_address=ray_address, device=device, fitness=[], allow_test_split=allow_test,
        repeats=_int(table, "repeats", 1, where, 1), min_path_length=_int(table, "min_path_length", 1, where, 1),
        max_path_length=_int(table, "max_path_length", None, where, 1),
        scales=_choice(table, "scales", "pair", SCALES, where), embed_from=model_or_none("embed_from"),
        head_from=model_or_none("head_from"), both_split=both_split,
        threads=_int(table, "threads", 0, where, 0), where=where)
    if settings.max_path_length is not None and settings.max_path_length < settings.min_path_length:
        raise MixcliError(f"{where} max_path_length {settings.max_path_length} is below min_path_length "
                          f"{settings.min_path_length}")
    settings.fitness = _fitness(table, project, registry, where, allow_test)
    return settings


def _both_split(table: dict, space: str, budget: int, where: str) -> float:
    if "both_split" in table and space != "both":
        raise MixcliError(f"{where} both_split applies only to space = \"both\" (the share of the budget the "
                          "parameter search gets); remove it")
    split = table.get("both_split", 0.5)
    if isinstance(split, bool) or not isinstance(split, (int, float)) or not 0 < split < 1:
        raise MixcliError(f"{where} both_split must be a number between 0 and 1 (exclusive), the parameter "
                          f"search's share of the budget, got {split!r}")
    if space == "both" and budget < 2:
        raise MixcliError(f"{where} budget {budget} is too small for space = \"both\": each of its two searches "
                          "needs at least 1 evaluation; give budget >= 2")
    return float(split)


def phase_budgets(settings: SearchSettings) -> tuple[int, int]:
    """space = "both": the parameter search's ⌊budget · both_split⌋ evaluations and the layer
    search's rest, each at least 1; together exactly ``budget``."""
    first = min(max(int(settings.budget * settings.both_split), 1), settings.budget - 1)
    return first, settings.budget - first


def _fitness(table: dict, project, registry, where: str, allow_test: bool) -> list[FitnessTerm]:
    from mixcli.evaluation import check_params

    entries = table.get("fitness")
    if entries is None or entries == []:
        raise MixcliError(f"{where}: no [[search.fitness]]; add at least one, e.g. [[search.fitness]] "
                          "evaluator = \"perplexity\", metric = \"loss\", data = \"valid.txt\"")
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise MixcliError(f"{where} fitness must be a list of [[search.fitness]] tables")
    terms = []
    for i, entry in enumerate(entries):
        here = f"{project.where}: [[search.fitness]] #{i + 1}"
        for key in ("evaluator", "metric"):
            if not isinstance(entry.get(key), str) or not entry.get(key):
                raise MixcliError(f"{here}: '{key}' is missing; give the evaluator and the metric it returns "
                                  "(`mixcli list-methods` shows the evaluators)")
        evaluator = registry.evaluators.get(entry["evaluator"])
        if evaluator is None:
            raise MixcliError(f"{here}: unknown evaluator '{entry['evaluator']}'"
                              f"{closest(entry['evaluator'], registry.evaluators)}")
        declared = dict(getattr(evaluator, "metrics", {}) or {})
        metric = entry["metric"]
        if metric not in declared and "*" not in declared:
            known = ", ".join(m for m in declared if m != "*") or "none"
            raise MixcliError(f"{here}: unknown metric '{metric}' for evaluator '{evaluator.name}'"
                              f"{closest(metric, declared)}; it returns: {known}")
        weight = entry.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight == 0:
            raise MixcliError(f"{here}: weight must be a non-zero number, got {weight!r}")
        params = {k: v for k, v in entry.items() if k not in FITNESS_KEYS}
        specs = evaluator.param_specs
        params = check_params(evaluator, params, here)
        split = _split(params, specs)
        if split is not None and not allow_test:
            raise MixcliError(f"{here}: the fitness would use the test split ({split}); search on a validation "
                              "split and keep the test split for the report ([[evaluation]]), or set "
                              "[search] allow_test_split = true to search on it anyway")
        for report in project.evaluations:
            if report.evaluator == evaluator.name and report.params == params:
                raise MixcliError(f"{here}: the fitness is the same as {report.where}, the report; the search "
                                  "split must not be the report split")
        terms.append(FitnessTerm(evaluator.name, metric, float(weight), params, here,
                                 declared.get(metric, declared.get("*", "higher")) != "lower"))
    return terms


def _split(params: dict, specs: dict) -> str | None:
    """What marks a fitness entry as using test data: its evaluator's ``split`` parameter set
    (or defaulting) to "test", or a data file named as a test split; None otherwise."""
    if "split" in specs:
        value = params.get("split", specs["split"].default)
        return f"split = {value!r}" if value == "test" else None
    for key, value in params.items():
        values = value.values() if isinstance(value, dict) else value if isinstance(value, list) else [value]
        for item in values:
            if isinstance(item, str) and _TEST_WORD.search(item.rsplit("/", 1)[-1].lower()):
                return f"{key} = {item!r}"
    return None


def population_size(settings: SearchSettings, dimension: int) -> int:
    """``popsize``, else CMA-ES's default 4 + ⌊3 ln D⌋ (mergekit-evolve's too)."""
    return settings.popsize or 4 + int(math.floor(3 * math.log(max(dimension, 1))))
