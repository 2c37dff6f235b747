"""Where candidates are built and scored: one at a time here (``serial``), in a local pool of
processes (``process``), or on Ray actors (``ray``: one per CPU slot or GPU, mergekit-evolve's
pool). Each gives results in the order of the recipes, so the history is the same."""

from __future__ import annotations

import os
import signal

from .fitness import FitnessSetup, forget_candidates, score


class SerialExecutor:
    def __init__(self, setup: FitnessSetup, workers: int = 1):
        self.setup = setup

    def map(self, recipes):
        for recipe in recipes:
            yield score(recipe, self.setup)

    def close(self) -> None:
        forget_candidates()


_worker_setup: FitnessSetup | None = None


def _start_worker(setup: FitnessSetup, threads: int) -> None:
    global _worker_setup
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the search's to handle, after a candidate
    import torch

    torch.set_num_threads(threads)
    _worker_setup = setup


def _score_in_worker(recipe: dict) -> dict:
    return score(recipe, _worker_setup)


def _threads(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // workers)


class ProcessExecutor:
    """A pool of ``workers`` processes (spawned: torch and fork do not mix), each scoring one
    candidate at a time with its share of the cores."""

    def __init__(self, setup: FitnessSetup, workers: int = 2):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self.pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                        initializer=_start_worker, initargs=(setup, _threads(workers)))

    def map(self, recipes):
        futures = [self.pool.submit(_score_in_worker, recipe) for recipe in recipes]
        try:
            for future in futures:
                yield future.result()
        finally:
            for future in futures:
                future.cancel()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class RayExecutor:
    """An ``ActorPool`` of ``workers`` actors, each holding the fitness set-up and scoring one
    candidate at a time (one CPU each, or one GPU each when the device is CUDA). Starts a local
    Ray unless ``ray_address`` names a cluster or Ray is already running."""

    def __init__(self, setup: FitnessSetup, workers: int = 2, address: str | None = None):
        import ray
        from ray.util import ActorPool

        if not ray.is_initialized():
            if address:
                ray.init(address=address, log_to_driver=False)
            else:
                ray.init(num_cpus=workers, log_to_driver=False, include_dashboard=False)
        gpu = setup.device.startswith("cuda")
        actor = ray.remote(num_cpus=1, num_gpus=1 if gpu else 0)(_ScoringActor)
        if gpu:  # each actor sees its own GPU as cuda:0
            from dataclasses import replace

            setup = replace(setup, device="cuda")
        self.actors = [actor.remote(setup, 1 if not gpu else _threads(workers)) for _ in range(workers)]
        self.pool = ActorPool(self.actors)

    def map(self, recipes):
        return self.pool.map(lambda actor, recipe: actor.score.remote(recipe), list(recipes))

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)


class _ScoringActor:
    def __init__(self, setup: FitnessSetup, threads: int):
        _start_worker(setup, threads)
        self.setup = setup

    def score(self, recipe: dict) -> dict:
        return score(recipe, self.setup)


def make_executor(settings, setup: FitnessSetup):
    if settings.executor == "process":
        return ProcessExecutor(setup, settings.workers)
    if settings.executor == "ray":
        return RayExecutor(setup, settings.workers, settings.ray_address)
    return SerialExecutor(setup)
