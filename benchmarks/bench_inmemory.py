"""Building a candidate in memory against merging it to disk, and candidates per minute.

Part 1, on the three ~0.85 B bf16 Llamas of ``bench_merge.py`` (built there, once): for each
recipe, in fresh processes with the page cache warm,

* ``disk``: ``mixcli merge`` (wall seconds, peak RSS);
* ``memory``: ``mixcli.inmemory.build`` of the same project (wall and CPU seconds of the
  process up to the end of that build, the build alone inside it, peak RSS);
* ``writes``: the time to write the built tensors with the merge's own writer
  (``ShardedWriter``, the same shard layout): what a disk merge spends on top of computing;
* ``in place``: in the memory process, a second build computed into the first one's tensors
  (``build(project, into=tensors)``, what ``build_model(project, model=previous)`` does in a
  search): no memory allocated or faulted in.

The target: ``memory`` costs no more than ``disk`` minus ``writes``, judged on CPU seconds
(user + system, all threads), which a shared machine disturbs far less than wall seconds;
both are printed.

Part 2, on the quick zoo (``--zoo``, default /work/zoo-shared/quick): candidates per minute of
a search's inner loop in one process (the models opened, the tensors built, the model made
resident, the fitness measured): vision, TIES of the six experts, classification accuracy
on every task; language, a weighted average of the four experts, exact match on every task.
Each candidate has its own weights; each is built as a new model, then (``in place``) into
the previous candidate's model. ``--samples`` caps the rows per task (the fitness is measured
on the validation split for language; vision's classification reads the tasks' own split).

    python benchmarks/bench_inmemory.py [--root .bench] [--only linear,ties] [--zoo PATH] [--candidates N]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_merge import RECIPES, build, measure, warm  # noqa: E402

DEFAULT = "linear,ties,dare_ties,slerp"


def child_memory(project: Path) -> None:
    """In a fresh process: build the project in memory; print the build's seconds."""
    from mixcli.core import load_project
    from mixcli.inmemory import build as build_in_memory

    project_obj, _ = load_project(project)
    start, cpu = time.perf_counter(), time.process_time()
    built = build_in_memory(project_obj)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    size = sum(t.numel() * t.element_size() for t in built.tensors.values())
    # a search's next candidate of the same shape: computed into the previous one's tensors
    start, again_cpu = time.perf_counter(), time.process_time()
    build_in_memory(load_project(project)[0], into=built.tensors)
    again, again_cpu = time.perf_counter() - start, time.process_time() - again_cpu
    print(json.dumps({"build_s": seconds, "build_cpu_s": cpu, "again_s": again, "again_cpu_s": again_cpu,
                      "bytes": size}))


def child_writes(project: Path, scratch: Path) -> None:
    """In a fresh process: build in memory, then time writing the tensors with the merge's writer."""
    from mixcli.core import load_project
    from mixcli.inmemory import build as build_in_memory
    from mixcli.safetensors_io import ShardedWriter, dtype_code

    project_obj, _ = load_project(project)
    built = build_in_memory(project_obj)
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    os.sync()
    start, cpu = time.perf_counter(), time.process_time()
    writer = ShardedWriter(scratch, [(n, dtype_code(t.dtype), tuple(t.shape)) for n, t in built.tensors.items()],
                           project_obj.shard_size)
    for name, tensor in built.tensors.items():
        writer.write(name, tensor)
    writer.close()
    (scratch / "config.json").write_text(json.dumps(built.config, indent=2) + "\n")
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps({"write_s": seconds, "write_cpu_s": cpu}))


def timed(command: list[str], root: Path) -> dict:
    """bench_merge's measure(), plus the CPU seconds (user + system) the child used: on a shared
    machine CPU time varies far less than wall time."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    stats = measure(command, root)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    stats["cpu_s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return stats


def run_child(args: list[str], root: Path) -> tuple[dict, dict]:
    out = root / "child.json"
    command = [sys.executable, __file__, "--child", *args, "--child-out", str(out)]
    stats = timed(command, root)
    return stats, json.loads(out.read_text())


def part_one(root: Path, methods: list[str]) -> None:
    build(root)
    print("wall and CPU seconds (user + system) of each process; build, writes and in place: inside the process")
    print(f"{'method':<10} {'disk s':>7} {'cpu':>6} {'RSS MiB':>8} | {'memory s':>8} {'cpu':>6} {'build s':>8} "
          f"{'cpu':>6} {'RSS MiB':>8} | {'writes s':>8} {'cpu':>6} | {'target (cpu)':>12} | {'in place s':>10} {'cpu':>6}")
    for method in methods:
        project = root / f"inmem-{method}.toml"
        project.write_text(RECIPES[method].format() + f'[output]\npath = "out-inmem-{method}"\nshard_size = "2GB"\n'
                           "copy_tokenizer = false\n")
        warm(root)
        shutil.rmtree(root / f"out-inmem-{method}", ignore_errors=True)
        os.sync()
        disk = timed([sys.executable, "-m", "mixcli", "merge", str(project), "--no-progress"], root)
        shutil.rmtree(root / f"out-inmem-{method}", ignore_errors=True)
        os.sync()
        warm(root)
        memory, inside = run_child(["memory", str(project)], root)
        warm(root)
        _, writes = run_child(["writes", str(project), str(root / f"scratch-{method}")], root)
        # the memory process without its second, in-place build: one candidate, as the merge makes one model
        memory_wall = memory["wall_s"] - inside["again_s"]
        memory_cpu = memory["cpu_s"] - inside["again_cpu_s"]
        budget = disk["cpu_s"] - writes["write_cpu_s"]
        verdict = f"{'met' if memory_cpu <= budget else 'missed'} {memory_cpu - budget:+.1f}"
        print(f"{method:<10} {disk['wall_s']:>7.1f} {disk['cpu_s']:>6.1f} {disk['max_rss_mib']:>8.0f} | "
              f"{memory_wall:>8.1f} {memory_cpu:>6.1f} {inside['build_s']:>8.1f} {inside['build_cpu_s']:>6.1f} "
              f"{memory['max_rss_mib']:>8.0f} | {writes['write_s']:>8.1f} {writes['write_cpu_s']:>6.1f} | "
              f"{verdict:>12} | {inside['again_s']:>10.1f} {inside['again_cpu_s']:>6.1f}", flush=True)


def zoo_candidates(zoo: Path, family: str, count: int, samples: int, in_place: bool, threads: int) -> dict:
    """Candidates per minute of build + resident model + fitness on one zoo family; with
    ``in_place`` each candidate overwrites the previous one's model. The fitness runs on
    ``threads`` torch threads (0: what `mixcli evolve` chooses for these models)."""
    import random

    from mixcli_evolve.fitness import torch_threads

    from mixcli.evaluation import run_evaluator
    from mixcli.inmemory import build_model
    from mixcli.plugins import get_registry
    from mixcli.project import project_from_dict

    manifest = json.loads((zoo / family / "manifest.json").read_text())
    experts = {e["task"]: str(zoo / e["path"]) for e in manifest["experts"]}
    rng = random.Random(0)
    evaluators = get_registry().evaluators
    times = {"build": 0.0, "fitness": 0.0}
    scores, previous = [], None
    for _ in range(count):
        weights = {task: round(rng.uniform(0.1, 1.0), 3) for task in experts}
        if family == "vision":
            models = {"base": str(zoo / manifest["base"])}
            models.update({t: {"path": p, "weight": weights[t]} for t, p in experts.items()})
            data = {"models": models, "method": {"name": "ties", "base": "base", "density": 0.2}}
            evaluator, params = evaluators["classification"], {"tasks": list(experts.values()), "max_samples": samples}
        else:
            data = {"models": {t: {"path": p, "weight": weights[t]} for t, p in experts.items()},
                    "method": {"name": "linear"}}
            tasks = {t: str(zoo / manifest["data"][t]["validation"]) for t in experts}
            evaluator, params = evaluators["exact_match"], {"tasks": tasks, "max_samples": samples}
        start = time.perf_counter()
        model = build_model(project_from_dict(data, zoo), model=previous if in_place else None)
        previous = model
        middle = time.perf_counter()
        with torch_threads(threads):
            metrics = run_evaluator(evaluator, None, params, "bench", base_dir=zoo, model=model, show_progress=False)
        end = time.perf_counter()
        times["build"] += middle - start
        times["fitness"] += end - middle
        scores.append(metrics["mean"])
    total = times["build"] + times["fitness"]
    return {"family": family, "candidates": count, "build_s": times["build"] / count,
            "fitness_s": times["fitness"] / count, "per_minute": 60 * count / total,
            "mean_score": sum(scores) / len(scores)}


def part_two(zoo: Path, count: int, samples: int, threads: int) -> None:
    if not (zoo / "vision" / "manifest.json").is_file():
        print(f"no zoo at {zoo}: part 2 skipped (build one with `mixcli zoo`)")
        return
    from mixcli.core import open_models
    from mixcli.inmemory import build_model  # noqa: F401  (imports outside the timing)
    from mixcli.project import project_from_dict
    from mixcli_evolve.fitness import scoring_threads
    from mixcli.plugins import get_registry

    print(f"{'zoo family':<10} {'model':<9} {'build s':>8} {'fitness s':>10} {'candidates/min':>15} {'mean score':>11}")
    for family in ("vision", "language"):
        manifest = json.loads((zoo / family / "manifest.json").read_text())
        base = project_from_dict({"models": {"base": str(zoo / manifest["base"])}, "method": {"name": "linear"}}, zoo)
        family_threads = scoring_threads(threads, open_models(base, get_registry()).values())
        print(f"{family}: fitness on {family_threads or 'torch default'} thread(s)", flush=True)
        zoo_candidates(zoo, family, 1, samples, False, family_threads)  # warm-up: imports, page cache; untimed
        for in_place in (False, True):
            row = zoo_candidates(zoo, family, count, samples, in_place, family_threads)
            print(f"{family:<10} {'in place' if in_place else 'new':<9} {row['build_s']:>8.3f} {row['fitness_s']:>10.3f} "
                  f"{row['per_minute']:>15.1f} {row['mean_score']:>11.3f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path(".bench"))
    parser.add_argument("--only", default=DEFAULT, help="comma-separated recipes of bench_merge.py, or 'none'")
    parser.add_argument("--zoo", type=Path, default=Path("/work/zoo-shared/quick"))
    parser.add_argument("--candidates", type=int, default=8, help="candidates per zoo family")
    parser.add_argument("--samples", type=int, default=0, help="rows per task for the fitness (0 = all)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads for the fitness (0 = what mixcli evolve chooses: 1 for the zoo)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import contextlib
        import io

        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            if args.child[0] == "memory":
                child_memory(Path(args.child[1]))
            else:
                child_writes(Path(args.child[1]), Path(args.child[2]))
        args.child_out.write_text(buffer.getvalue().strip().splitlines()[-1])
        return
    if args.only != "none":
        part_one(args.root.absolute(), args.only.split(","))
    part_two(args.zoo, args.candidates, args.samples, args.threads)


if __name__ == "__main__":
    main()
