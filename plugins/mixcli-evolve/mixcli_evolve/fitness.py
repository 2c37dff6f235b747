"""Building one candidate and scoring it: the weighted sum of its [[search.fitness]] metrics."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

from mixcli.errors import MixcliError

from .recipe import recipe_hash, recipe_text
from .settings import FitnessTerm


@dataclass
class FitnessSetup:
    """What every worker needs to score recipes (picklable: it travels to processes and actors)."""

    terms: list[FitnessTerm]
    models: dict[str, Path]  # the project's models, for evaluators that read per-task heads
    base_dir: Path  # the project's folder: relative data paths and recipe paths resolve here
    device: str = "cpu"
    threads: int = 0  # torch threads while scoring; 0: as the executor set them


# Below this many elements in its largest matrix a model is scored on one thread: the matrices of
# such a model are too small for a second thread to pay, and on a busy machine threads that wait
# for one another make every operation many times slower (a 64-wide model ran 15x slower on 2).
SMALL_MATRIX = 1 << 20


def scoring_threads(threads: int, checkpoints) -> int:
    """``[search] threads`` if set; otherwise 1 for models whose matrices are all small, else 0
    (the executor's share of the cores)."""
    if threads:
        return threads
    largest = max((math.prod(info.shape) for checkpoint in checkpoints for info in checkpoint.tensors.values()
                   if len(info.shape) == 2), default=0)
    return 1 if largest < SMALL_MATRIX else 0


@contextlib.contextmanager
def torch_threads(threads: int):
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


_previous = None  # this process's last candidate: the next one of the same shape is computed into it


@contextlib.contextmanager
def candidate(recipe: dict, setup: FitnessSetup):
    """The candidate of ``recipe`` as (a name for messages, a resident transformers model), built in
    memory by the engine `mixcli merge` uses: its tensors are bitwise those `mixcli merge` writes
    for the same recipe, and nothing is written to disk. A candidate of the previous one's
    shape is computed into the previous one's tensors, so a search allocates one model, not
    one per candidate."""
    global _previous
    from mixcli.inmemory import build_model
    from mixcli.project import project_from_dict

    project = project_from_dict(recipe, setup.base_dir, "candidate.toml")
    model = build_model(project, device=setup.device, model=_previous)
    _previous = model
    yield Path(f"candidate {recipe_hash(recipe)}"), model


def forget_candidates() -> None:
    """Let the last candidate go (a search's end)."""
    global _previous
    _previous = None


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
    with candidate(recipe, setup) as (name, model), torch_threads(setup.threads):
        for term in setup.terms:
            metrics = run_evaluator(registry.evaluators[term.evaluator], name, dict(term.params), term.where,
                                    setup.models, setup.base_dir, setup.device, model=model, show_progress=False)
            results.append({key: float(value) for key, value in metrics.items()
                            if isinstance(value, (int, float)) and not isinstance(value, bool)})
    fitness = combine(setup.terms, results)
    entry = {"fitness": fitness, "metrics": results, "seconds": round(time.perf_counter() - started, 3)}
    if not math.isfinite(fitness):
        # a diverged candidate (NaN or overflowing loss) is unscored: it ranks worst, never best
        entry.update(fitness=None, unscored=f"fitness is {fitness}")
    return entry


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
