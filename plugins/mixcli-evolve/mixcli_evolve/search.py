"""The search loop: ask a generation, decode each genotype into a recipe, score the new ones
within the budget, tell, record every candidate, keep the best recipe on disk.

The output folder holds ``record.jsonl`` (a header line, then one line per candidate, in the
order the strategy asked them), ``best.toml`` (a plain mixcli project of the best candidate so
far, rewritten atomically on every improvement) and, at the end, the best model (``model/``),
``report.json`` and ``fitness.png``. Resuming replays the record through a fresh strategy of the
same seed: the strategy asks the same genotypes again and is told the recorded scores, so the
continued history is the one an uninterrupted search would have made.
"""

from __future__ import annotations

import json
import math
import signal
from dataclasses import dataclass, field
from pathlib import Path

from mixcli.errors import MixcliError

from .fitness import FitnessSetup
from .genome import Genome
from .recipe import BEST_RECIPE, recipe_hash, recipe_text, skeleton, write_atomically
from .settings import SearchSettings, parse_search, population_size

RECORD = "record.jsonl"
WORST = 1e30  # the loss of an infeasible candidate (CMA-ES only ranks losses)


@dataclass
class SearchPlan:
    """A checked [search]: its settings, genome and strategy parameters."""

    project: object
    method: object
    settings: SearchSettings
    genome: Genome
    popsize: int
    phase: dict | None = None  # space = "both": which of its two searches this is

    def header(self) -> dict:
        s = self.settings
        return {"search": 1, **(self.phase or {}), "space": s.space, "method": s.method, "models": s.models, "genes": list(s.genes),
                "shape": list(self.genome.shape), "dimension": self.genome.dimension, "popsize": self.popsize,
                "sigma0": s.sigma0, "seed": s.seed, "strategy": s.strategy, "random_init": s.random_init,
                "fitness": [{"evaluator": t.evaluator, "metric": t.metric, "weight": t.weight, **t.params}
                            for t in s.fitness],
                "recipe": recipe_hash(self.genome.skeleton)}


def plan_search(project, method, registry) -> SearchPlan:
    """Settings, genome and population of the project's [search]; reads model configs only."""
    from mixcli.core import open_model

    settings = parse_search(project, method, registry)
    if settings.space == "both":
        from .both import plan_both

        return plan_both(project, method, registry, settings)
    layers = {}
    for name in settings.models + ([settings.base] if settings.base and settings.space != "layers" else []):
        layers[name] = open_model(project.models[name], registry).num_layers
        if layers[name] is None:
            raise MixcliError(f"{project.models[name].where}: the model has no layer count in its config.json, "
                              "so the search cannot lay out its layers")
    if settings.space == "layers":
        from .paths import PathGenome

        paths = {name: entry["path"] for name, entry in skeleton(project, method, settings)["models"].items()}
        genome = PathGenome(settings, layers, {name: paths[name] for name in settings.models})
        return SearchPlan(project, method, settings, genome, population_size(settings, genome.dimension))
    if len(set(layers.values())) != 1:
        counts = ", ".join(f"'{name}' {count}" for name, count in layers.items())
        raise MixcliError(f"{settings.where}: the searched models need the same number of layers ({counts})")
    genome = Genome(settings, next(iter(layers.values())), skeleton(project, method, settings))
    return SearchPlan(project, method, settings, genome, population_size(settings, genome.dimension))


@dataclass
class Outcome:
    entries: list[dict]
    best: dict | None
    stopped: bool  # Ctrl-C
    evaluations: int
    folder: Path
    recipes: dict = field(default_factory=dict)  # recipe hash -> recipe, of this run's candidates
    phases: dict = field(default_factory=dict)  # space = "both": phase name -> that search's Outcome


class _StopAfterCandidate:
    """The first Ctrl-C asks the search to stop after the current candidate; a second one
    interrupts at once."""

    def __init__(self, say):
        self.requested = False
        self.say = say

    def __enter__(self):
        self.previous = signal.getsignal(signal.SIGINT)
        try:
            signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: no Ctrl-C to catch
            self.previous = None
        return self

    def _handle(self, signum, frame):
        if self.requested:
            signal.signal(signal.SIGINT, self.previous)
            raise KeyboardInterrupt
        self.requested = True
        self.say("stopping after the current candidate (Ctrl-C again to stop now)")

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def read_record(folder: Path) -> tuple[dict | None, list[dict]]:
    path = folder / RECORD
    if not path.is_file():
        return None, []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    try:
        rows = [json.loads(line) for line in lines]
    except ValueError:
        rows = []
        for number, line in enumerate(lines):
            try:
                rows.append(json.loads(line))
            except ValueError:
                if number == len(lines) - 1:  # a line cut short by a kill: the candidate is scored again
                    break
                raise MixcliError(f"{path}:{number + 1}: not a JSON line; the record is damaged") from None
    if not rows or "search" not in rows[0]:
        raise MixcliError(f"{path}: not a mixcli evolve record (no header line)")
    return rows[0], rows[1:]


def _drop_cut_line(path: Path) -> None:
    """A record whose last line a kill cut short is rewritten without it before anything is
    appended (appending to it would glue two entries into one damaged line)."""
    text = path.read_text()
    if not text or text.endswith("\n"):
        return
    head, _, last = text.rpartition("\n")
    try:
        json.loads(last)
        kept = text + "\n"  # the entry is whole, only its newline is missing
    except ValueError:
        kept = head + "\n"
    write_atomically(path, kept)


def prepare_folder(folder: Path, plan: SearchPlan, resume: bool, force: bool) -> list[dict]:
    """The output folder, checked: the recorded entries to replay (resume), or a fresh record."""
    from mixcli.target import protected_folders

    if folder.exists() and not folder.is_dir():
        raise MixcliError(f"{folder}: is a file, not a folder; choose another [output] path (or --out) for the "
                          "search")
    header, entries = read_record(folder)
    for label, inputs in protected_folders(plan.project).items():
        real, other = folder.resolve(), Path(inputs).resolve()
        if real == other or real.is_relative_to(other) or other.is_relative_to(real):
            raise MixcliError(f"{folder}: the search's output folder overlaps {label} ({other}); choose another "
                              "[output] path")
    if resume:
        if header is None:
            raise MixcliError(f"{folder}: no search to resume (no {RECORD}); run without --resume")
        mine = plan.header()
        for key, value in mine.items():
            if header.get(key) != value:
                raise MixcliError(f"{folder / RECORD}: recorded by a different search ({key} was "
                                  f"{header.get(key)!r}, the project now gives {value!r}); resume with the "
                                  "same project, or start again with --force")
        done = max((e["evaluation"] for e in entries), default=0)
        if done > plan.settings.budget:
            raise MixcliError(f"{folder / RECORD}: holds {done} evaluations, more than [search] budget = "
                              f"{plan.settings.budget}; give a budget of at least {done} to resume it")
        _drop_cut_line(folder / RECORD)
        return entries
    if header is not None and not force:
        raise MixcliError(f"{folder}: holds a search record; pass --resume to continue it or --force to start over")
    if folder.exists() and header is None and any(folder.iterdir()):
        raise MixcliError(f"{folder}: exists and is not a search's folder; choose another [output] path "
                          "(mixcli evolve writes only into its own folder)")
    folder.mkdir(parents=True, exist_ok=True)
    for name in (RECORD, BEST_RECIPE, "report.json", "fitness.png"):
        (folder / name).unlink(missing_ok=True)
    write_atomically(folder / RECORD, json.dumps(plan.header()) + "\n")
    return []


def run(plan: SearchPlan, folder: Path, executor, setup: FitnessSetup, replay: list[dict],
        progress=None, say=print, render=recipe_text) -> Outcome:
    """Search until the budget is spent (or Ctrl-C); every candidate is appended to the record.
    ``render(recipe, note)`` is the text of ``best.toml`` for a recipe."""
    import numpy as np

    from mixcli.plugins import get_registry

    settings, genome = plan.settings, plan.genome
    registry = get_registry()
    x0 = genome.initial()
    strategy = registry.strategies[settings.strategy].create(x0, settings.sigma0, plan.popsize, settings.seed,
                                                             genome.binary())
    entries: list[dict] = []
    cache: dict[str, dict] = {}  # recipe hash -> the entry that scored it
    recipes: dict[str, dict] = {}
    best = None
    evaluations = 0
    generation = 0
    replay = list(replay)
    record = open(folder / RECORD, "a")
    stop = _StopAfterCandidate(say)

    def append(entry: dict, recipe: dict) -> None:
        nonlocal best
        entries.append(entry)
        if recipe is not None:
            recipes.setdefault(entry["recipe"], recipe)
        if entry.get("replayed"):
            entry.pop("replayed")
        else:
            record.write(json.dumps(entry) + "\n")
            record.flush()
            if entry.get("unscored"):
                say(f"evaluation {entry['evaluation']}: {entry['unscored']}; the candidate ranks worst")
        fitness = entry["fitness"]
        if fitness is not None and (best is None or fitness > best["fitness"]):
            best = entry
            if not entry.get("cached"):
                note = (f"the best recipe of `mixcli evolve {plan.project.file.name}`: fitness {fitness!r} at "
                        f"evaluation {entry['evaluation']} (recipe {entry['recipe']}); `mixcli merge` it")
                write_atomically(folder / BEST_RECIPE, render(recipe, note))
        if progress is not None:
            progress(entry, best, generation)

    try:
        with stop:
            while evaluations < settings.budget and not stop.requested:
                genotypes = strategy.ask()
                decoded = [genome.decode(x) for x in genotypes]
                # a layer path outside the length limits decodes to None: not built, scored worst, counted
                hashes = [None if recipe is None else recipe_hash(recipe) for recipe in decoded]
                losses: list[float | None] = [None] * len(genotypes)
                # which candidates are new, within what is left of the budget
                fresh, infeasible, seen, left = [], set(), set(cache), settings.budget - evaluations
                replayed = 0
                for i, key in enumerate(hashes):
                    if i < len(replay) and not fresh:
                        replayed += 1
                        seen.add(key)
                        left -= 0 if replay[i].get("cached") else 1
                        continue
                    if key is None or key not in seen:
                        if len(fresh) + len(infeasible) == left:
                            break
                        if key is None:
                            infeasible.add(i)
                        else:
                            fresh.append(i)
                            seen.add(key)
                results = executor.map([decoded[i] for i in fresh]) if fresh else iter(())
                for i, (x, recipe, key) in enumerate(zip(genotypes, decoded, hashes)):
                    if i < replayed:
                        entry = replay.pop(0)
                        if entry.get("recipe") != key or not np.allclose(entry["genotype"], x, rtol=0, atol=0):
                            raise MixcliError(f"{folder / RECORD}: candidate {len(entries) + 1} differs from the "
                                              "one the strategy asks again; the record is not this search's "
                                              "(start again with --force)")
                        entry["replayed"] = True
                        if not entry.get("cached"):
                            evaluations = max(evaluations, entry["evaluation"])
                            if key is not None:
                                cache.setdefault(key, entry)
                    elif key is not None and key in cache:
                        hit = cache[key]
                        entry = {"candidate": len(entries) + 1, "generation": generation, "evaluation": evaluations,
                                 "genotype": x, "recipe": key, "fitness": hit["fitness"], "metrics": hit["metrics"],
                                 "seconds": 0.0, "cached": True}
                    elif i in fresh:
                        result = next(results)
                        evaluations += 1
                        entry = {"candidate": len(entries) + 1, "generation": generation, "evaluation": evaluations,
                                 "genotype": x, "recipe": key, **result, "cached": False}
                        cache[key] = entry
                    elif i in infeasible:
                        evaluations += 1
                        entry = {"candidate": len(entries) + 1, "generation": generation, "evaluation": evaluations,
                                 "genotype": x, "recipe": None, "fitness": None, "metrics": [], "seconds": 0.0,
                                 "cached": False, "infeasible": True}
                    else:
                        break  # past the budget: the last generation is cut short
                    append(entry, recipe)
                    fitness = entry["fitness"]
                    losses[i] = WORST if fitness is None or not math.isfinite(fitness) else -fitness
                    if stop.requested and not replay:
                        break
                if any(loss is None for loss in losses):
                    break
                strategy.tell(genotypes, losses)
                generation += 1
    finally:
        record.close()
        results = None
    return Outcome(entries, best, stop.requested, evaluations, folder, recipes)
