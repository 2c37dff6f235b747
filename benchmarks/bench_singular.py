"""Time and memory of the singular-vector merges (tsv_merge, iso_c, iso_cts) next to ties and
next to their floor: the same SVDs alone, on the same matrices, with the same threads.

Two set-ups, bf16, embeddings and head excluded from the SVD rule as the method notes advise
for causal LMs:

* ``--models DIR``: base + 2 experts, the three 0.85 B models of benchmarks/bench_merge.py
  (``DIR`` is its ``--root``; built there if missing). The whole model is merged, so the peak
  RSS is the full-size one; the SVD rule runs on the first ``--svd-layers`` layers (default:
  all 16; the others take the mean task vector through ``decompose = false``). Every layer
  costs the same, so a partial run's SVD seconds and its arithmetic beyond them scale with the
  layers given the SVD rule, while reading, the mean path and writing stay those of the whole
  model: a partial run's ratio is above the full run's.
* otherwise it builds (once, seeded) base + ``--experts`` models of ``--layers`` layers in the
  same layout (default 1 layer, 2 experts: every matrix shape of the 0.85 B model at full
  size) under ``--root``; ``--experts 8`` shows where ``svd_solver = "randomized"`` pays.

Projects and outputs go to ``--out`` (default: ``out-singular`` in the models' folder); each
run's previous output there is deleted untimed and the inputs' page cache is warmed first.

Per method it prints the wall seconds, max RSS and peak anonymous memory of `mixcli merge`,
and its floor: the seconds spent inside the decompositions of :mod:`mixcli.svd` (``svd``,
through which every SVD of these methods runs: each task vector's, the sum's, the residuals'
and the polar factors'; and ``randomized_svd``). The merge itself times them, so they are the
same SVDs on the same matrices at the threads the engine gives them: a matrix of at least
``INTRA_OP_MIN_SIDE`` on both sides runs alone on every core, and its SVD seconds count as
they are; smaller matrices run one per worker beside other tensors, so they are timed again
afterwards, alone on one thread each, and their sum is divided by the cores they would share.
``ratio`` is merge / floor; ``arith s`` is what the large decomposed matrices cost beyond
their SVDs (task vectors, products, rounding into the output); the rest of the wall is
starting Python and torch, reading, the mean path of the other tensors and writing.
``--svd-solver randomized`` runs tsv_merge with its approximate SVD (its floor is then the
range finder's seconds and the polar SVDs').

    python benchmarks/bench_singular.py --models .bench [--svd-layers 1] [--only ties,tsv_merge,iso_cts]
        [--out DIR] [--svd-solver randomized]
    python benchmarks/bench_singular.py [--root .bench/singular] [--layers 1] [--experts 2] [--hidden 2048]
        [--intermediate 5632] [--vocab 32000] [--only tsv_merge,iso_cts] [--workers N]
    python benchmarks/bench_singular.py --solver-times   # full SVD vs range finder, T = 4, 8, 16
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import bench_merge  # noqa: E402  (its models, page-cache warming and memory sampling)

EXCLUDE = ["model.embed_tokens.weight", "lm_head.weight"]
RECIPES = {
    "ties": 'name = "ties"\nbase = "base"\nweight = 0.5\ndensity = 0.5',
    "tsv_merge": f'name = "tsv_merge"\nbase = "base"\nexclude_keys = {json.dumps(EXCLUDE)}',
    "iso_c": f'name = "iso_c"\nbase = "base"\nscaling_factor = 1.5\nexclude_keys = {json.dumps(EXCLUDE)}',
    "iso_cts": f'name = "iso_cts"\nbase = "base"\nscaling_factor = 1.5\nexclude_keys = {json.dumps(EXCLUDE)}',
}
APPROXIMATE = ("tsv_merge",)  # the methods with svd_solver

# the merge, with the seconds inside mixcli.svd's decompositions (svd, and randomized_svd for
# svd_solver = "randomized", which may call svd: counted once) per output tensor, thread-local
# (each tensor is computed on one worker thread), written to argv[1] as JSON
CHILD = """
import json, sys, threading, time
import mixcli.svd
from mixcli import tensorwise
from mixcli.cli import cli

records, local, run = [], threading.local(), tensorwise._Compute._run

def timed(function):
    def call(*args):
        if getattr(local, "inside", False):
            return function(*args)
        local.inside, start = True, time.perf_counter()
        try:
            return function(*args)
        finally:
            local.inside = False
            local.svd += time.perf_counter() - start
            local.calls += 1
    return call

def timed_run(self, target):
    local.svd, local.calls = 0.0, 0
    start = time.perf_counter()
    try:
        return run(self, target)
    finally:
        records.append([self.name, time.perf_counter() - start, local.svd, local.calls])

mixcli.svd.svd, mixcli.svd.randomized_svd = timed(mixcli.svd.svd), timed(mixcli.svd.randomized_svd)
tensorwise._Compute._run = timed_run
try:
    cli(sys.argv[2:], standalone_mode=False)
finally:
    with open(sys.argv[1], "w") as f:
        json.dump(records, f)
"""


def shapes(args) -> dict[str, tuple]:
    h, i, v = args.hidden, args.intermediate, args.vocab
    kv = h // 16 * 4
    out = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for layer in range(args.layers):
        p = f"model.layers.{layer}."
        out.update({p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                    p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                    p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                    p + "mlp.down_proj.weight": (h, i), p + "input_layernorm.weight": (h,),
                    p + "post_attention_layernorm.weight": (h,)})
    return out


def build(root: Path, args) -> None:
    import torch
    from safetensors.torch import save_file

    marker = root / "built.json"
    wanted = {"shapes": {k: list(v) for k, v in shapes(args).items()}, "experts": args.experts}
    if marker.is_file() and json.loads(marker.read_text()) == wanted:
        return
    g = torch.Generator().manual_seed(0)
    base = {name: (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16) for name, shape in shapes(args).items()}
    config = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=args.hidden,
                  intermediate_size=args.intermediate, num_hidden_layers=args.layers, num_attention_heads=16,
                  num_key_value_heads=4, vocab_size=args.vocab, tie_word_embeddings=False, dtype="bfloat16")
    for name in ["base"] + [f"ft{i + 1}" for i in range(args.experts)]:
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        tensors = base if name == "base" else {
            k: (v.float() + torch.randn(v.shape, generator=g) * 0.002).to(torch.bfloat16) for k, v in base.items()}
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps(config))
    marker.write_text(json.dumps(wanted))


def svd_rule(svd_layers: int | None) -> str:
    """The recipe line that keeps the SVD rule to the first ``svd_layers`` layers."""
    if svd_layers is None:
        return ""
    keep = [f'{{ filter = "model.layers.{i}.", value = true }}' for i in range(svd_layers)]
    return f"\ndecompose = [{', '.join(keep + ['{ value = false }'])}]"


def write_project(root: Path, out: Path, method: str, svd_layers: int | None, solver: str | None,
                  experts: int) -> Path:
    label = method if solver is None else f"{method}-{solver}"
    project = out / f"{label}.toml"
    rule = svd_rule(svd_layers) if method != "ties" else ""
    rule += f'\nsvd_solver = "{solver}"' if solver else ""
    models = "".join(f'{name} = "{root / name}"\n' for name in ["base"] + [f"ft{i + 1}" for i in range(experts)])
    project.write_text(f'[models]\n{models}[method]\n{RECIPES[method]}{rule}\ndtype = "bfloat16"\n'
                       f'[output]\npath = "out-{label}"\ncopy_tokenizer = false\n')
    return project


def run_merge(root: Path, out: Path, project: Path, workers: int | None) -> tuple[dict, list]:
    """bench_merge.measure's figures for one `mixcli merge`, and the per-tensor timings."""
    bench_merge.warm(root)
    shutil.rmtree(out / f"out-{project.stem}", ignore_errors=True)  # ours, from the last run
    os.sync()
    timings = out / f"{project.stem}.timings.json"
    command = [sys.executable, "-c", CHILD, str(timings), "merge", str(project), "--force", "--no-progress"]
    result = bench_merge.measure(command + (["--workers", str(workers)] if workers else []), out)
    return result, json.loads(timings.read_text())


def floor(project: Path, records: list, workers: int) -> tuple[float, float]:
    """The SVD floor and the large decomposed matrices' arithmetic beyond their SVDs (s)."""
    import time

    import torch

    import mixcli.svd
    from mixcli import core
    from mixcli.tensorwise import INTRA_OP_MIN_SIDE

    prepared = core.prepare(project)
    planned = {t.name: t for t in prepared.plan.tensors}
    large = [r for r in records if r[3] and min(planned[r[0]].shape) >= INTRA_OP_MIN_SIDE]
    small = {r[0] for r in records if r[3]} - {r[0] for r in large}
    seconds, inside, originals = [0.0], [False], (mixcli.svd.svd, mixcli.svd.randomized_svd)

    def timed(function):
        def call(*args):
            if inside[0]:
                return function(*args)
            inside[0], start = True, time.perf_counter()
            try:
                return function(*args)
            finally:
                inside[0] = False
                seconds[0] += time.perf_counter() - start
        return call

    # the smaller matrices alone, one thread each (as the engine gives them), then shared out
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    mixcli.svd.svd, mixcli.svd.randomized_svd = (timed(f) for f in originals)
    try:
        for name in sorted(small):
            planned[name].compute()
    finally:
        mixcli.svd.svd, mixcli.svd.randomized_svd = originals
        torch.set_num_threads(threads)
    cores = min(workers, os.cpu_count() or 1)
    return sum(r[2] for r in large) + seconds[0] / cores, sum(r[1] - r[2] for r in large)


def solver_times(shapes=((2048, 2048), (5632, 2048)), tasks=(4, 8, 16)) -> None:
    """Seconds of the full SVD and of the range finder of ``svd_solver = "randomized"``
    (:func:`mixcli.svd.range_finder_svd`, run directly also below T = 8, where the method
    takes the full SVD instead) at TSV-M's k = int(r/T), on every core as the engine gives a
    large matrix, on seeded float32 matrices (the range finder's time does not depend on
    the values)."""
    import time

    import torch

    from mixcli.svd import range_finder_svd, svd

    torch.set_num_threads(os.cpu_count() or 1)
    generator = torch.Generator().manual_seed(0)
    for shape in shapes:
        matrix = torch.randn(*shape, generator=generator)
        start = time.perf_counter()
        svd(matrix)
        cells = [f"full SVD {time.perf_counter() - start:.2f} s"]
        for t in tasks:
            k = int(min(shape) / t)
            start = time.perf_counter()
            range_finder_svd(matrix, k)
            cells.append(f"range finder T={t} (k={k}) {time.perf_counter() - start:.2f} s")
        print(f"{shape[0]} x {shape[1]}: " + ", ".join(cells), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, help="bench_merge.py's root: its three 0.85 B models")
    parser.add_argument("--svd-layers", type=int, help="with --models: layers given the SVD rule (default 16)")
    parser.add_argument("--root", type=Path, default=Path(".bench/singular"))
    parser.add_argument("--out", type=Path, help="projects and outputs (default: out-singular in the models' folder)")
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--experts", type=int, default=2, help="without --models: fine-tunes built besides the base")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--only", default="ties,tsv_merge,iso_c,iso_cts")
    parser.add_argument("--svd-solver", choices=("full", "randomized"), help="tsv_merge's svd_solver")
    parser.add_argument("--workers", type=int)
    parser.add_argument("--solver-times", action="store_true",
                        help="only time the full SVD against svd_solver = \"randomized\"'s range finder")
    args = parser.parse_args()
    if args.solver_times:
        return solver_times()
    from mixcli.engine import default_workers

    workers = args.workers or default_workers()
    svd_layers = None
    if args.models:
        root = args.models.absolute()
        bench_merge.build(root)
        layers = bench_merge.SHAPE["layers"]
        svd_layers = min(layers, args.svd_layers or layers)
        print(f"the 0.85 B models of bench_merge.py ({layers} layers), SVD rule on {svd_layers} of them; ", end="")
    else:
        root = args.root.absolute()
        root.mkdir(parents=True, exist_ok=True)
        build(root, args)
        print(f"{args.layers} layer(s), hidden {args.hidden}, intermediate {args.intermediate}; ", end="")
    out = (args.out or root / "out-singular").absolute()
    out.mkdir(parents=True, exist_ok=True)
    print(f"base + {2 if args.models else args.experts} experts, bf16; {os.cpu_count()} cores, {workers} workers")
    print(f"{'method':<20} {'merge s':>8} {'max RSS MiB':>12} {'anon MiB':>9} {'SVD floor s':>12} {'ratio':>6} "
          f"{'arith s':>8} {'load':>10}")
    for method in args.only.split(","):
        solver = args.svd_solver if method in APPROXIMATE else None
        project = write_project(root, out, method, svd_layers, solver, 2 if args.models else args.experts)
        result, records = run_merge(root, out, project, args.workers)
        svd_floor, arithmetic = floor(project, records, workers) if method != "ties" else (None, None)
        cells = (f"{svd_floor:12.1f} {result['wall_s'] / svd_floor:6.2f} {arithmetic:8.1f}" if svd_floor
                 else f"{'-':>12} {'-':>6} {'-':>8}")
        print(f"{project.stem:<20} {result['wall_s']:8.1f} {result['max_rss_mib']:12.0f} "
              f"{result['peak_anon_mib']:9.0f} {cells} {result['load_before']:>4.1f}-{result['load_after']:<4.1f}",
              flush=True)


if __name__ == "__main__":
    main()
