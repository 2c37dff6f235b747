"""Building one candidate and scoring it: the weighted sum of its [[search.fitness]] metrics."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from mixcli.errors import MixcliError

from .recipe import recipe_text
from .settings import FitnessTerm


@dataclass
class FitnessSetup:
    """What every worker needs to score recipes (picklable: it travels to processes and actors)."""

    terms: list[FitnessTerm]
    models: dict[str, Path]  # the project's models, for evaluators that read per-task heads
    base_dir: Path  # the project's folder: relative data paths and recipe paths resolve here
    scratch: Path  # where candidates built on disk live while they are measured
    device: str = "cpu"


@contextlib.contextmanager
def candidate(recipe: dict, setup: FitnessSetup):
    """The candidate of ``recipe`` as (model folder, resident model or None), gone afterwards.

    It is merged, by the engine `mixcli merge` uses, into a scratch folder beside the record,
    so that the scored model is the one `mixcli merge best.toml` writes."""
    setup.scratch.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="candidate-", dir=setup.scratch))
    try:
        yield merge_recipe(recipe, setup.base_dir, folder / "model", progress=False), None
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def merge_recipe(recipe: dict, base_dir: Path, target: Path, progress: bool = True, force: bool = False) -> Path:
    """Write the model of ``recipe`` to ``target`` with `mixcli merge`'s engine; returns it."""
    from mixcli import core, engine
    from mixcli.target import protected_folders

    data = dict(recipe, output=dict(recipe.get("output", {}), path=str(target)))
    prepared = core.prepare(Path(base_dir) / "candidate.toml", recipe_text(data))
    written_recipe = core.recipe(prepared.project)
    return engine.write_plan(prepared.plan, Path(target), force=force, shard_size=prepared.project.shard_size,
                             card=core.model_card(prepared, written_recipe), recipe=written_recipe,
                             copy_tokenizer=prepared.project.copy_tokenizer, workers=engine.default_workers(),
                             progress=progress, protected=protected_folders(prepared.project, prepared.models))


def score(recipe: dict, setup: FitnessSetup, registry=None) -> dict:
    """Build the candidate, run every fitness term on it: ``{"fitness", "metrics", "seconds"}``."""
    from mixcli.evaluation import run_evaluator
    from mixcli.plugins import get_registry

    registry = registry or get_registry()
    started = time.perf_counter()
    results = []
    with candidate(recipe, setup) as (folder, _model):
        for term in setup.terms:
            metrics = run_evaluator(registry.evaluators[term.evaluator], folder, dict(term.params), term.where,
                                    setup.models, setup.base_dir, setup.device)
            results.append({key: float(value) for key, value in metrics.items()
                            if isinstance(value, (int, float)) and not isinstance(value, bool)})
    return {"fitness": combine(setup.terms, results), "metrics": results,
            "seconds": round(time.perf_counter() - started, 3)}


def combine(terms: list[FitnessTerm], results: list[dict]) -> float:
    """Σ weight · value, a lower-is-better metric counted negatively."""
    total = 0.0
    for term, metrics in zip(terms, results):
        if term.metric not in metrics:
            raise MixcliError(f"{term.where}: evaluator '{term.evaluator}' returned no metric '{term.metric}' "
                              f"(it returned: {', '.join(metrics) or 'nothing'})")
        value = metrics[term.metric]
        total += term.weight * (value if term.higher_is_better else -value)
    return total
