"""Time and memory of the singular-vector merges (tsv_merge, iso_c, iso_cts) next to ties and
next to their floor: the same SVDs alone, on the same matrices, with the same threads.

Two set-ups, base + 2 experts in bf16, embeddings and head excluded from the SVD rule as the
method notes advise for causal LMs:

* ``--models DIR``: the three 0.85 B models of benchmarks/bench_merge.py (``DIR`` is its
  ``--root``, default .bench; built there if missing). The whole model is merged, so the peak
  RSS is the full-size one; the SVD rule runs on the first ``--svd-layers`` layers (default:
  all 16; the others take the mean task vector through ``decompose = false``), since all 16
  take hours on 2 cores: the merge's time beyond its floor scales with the layers SVD'd.
* otherwise it builds (once, seeded) a small model of ``--layers`` layers in the same layout
  (default 1: every matrix shape of the 0.85 B model at full size) under ``--root``.

Prints the core count and load average, then per method the wall seconds and peak RSS of
`mixcli merge` and the seconds of its SVDs alone (each task vector's SVD, and the polar
factors'), run as the engine runs them: matrices with a side under INTRA_OP_MIN_SIDE one per
worker thread, larger ones one at a time on every core.

    python benchmarks/bench_singular.py --models .bench [--svd-layers 1] [--only ties,tsv_merge,iso_cts]
    python benchmarks/bench_singular.py [--root .bench/singular] [--layers 1] [--hidden 2048]
        [--intermediate 5632] [--vocab 32000] [--only tsv_merge,iso_cts] [--workers N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

EXCLUDE = ["model.embed_tokens.weight", "lm_head.weight"]
RECIPES = {
    "ties": 'name = "ties"\nbase = "base"\nweight = 0.5\ndensity = 0.5',
    "tsv_merge": f'name = "tsv_merge"\nbase = "base"\nexclude_keys = {json.dumps(EXCLUDE)}',
    "iso_c": f'name = "iso_c"\nbase = "base"\nscaling_factor = 1.5\nexclude_keys = {json.dumps(EXCLUDE)}',
    "iso_cts": f'name = "iso_cts"\nbase = "base"\nscaling_factor = 1.5\nexclude_keys = {json.dumps(EXCLUDE)}',
}


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
    wanted = {"shapes": {k: list(v) for k, v in shapes(args).items()}}
    if marker.is_file() and json.loads(marker.read_text()) == wanted:
        return
    g = torch.Generator().manual_seed(0)
    base = {name: (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16) for name, shape in shapes(args).items()}
    config = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=args.hidden,
                  intermediate_size=args.intermediate, num_hidden_layers=args.layers, num_attention_heads=16,
                  num_key_value_heads=4, vocab_size=args.vocab, tie_word_embeddings=False, dtype="bfloat16")
    for name in ("base", "ft1", "ft2"):
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


def run_merge(root: Path, method: str, workers: int | None, svd_layers: int | None) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB, mapped input pages included) of one `mixcli merge`."""
    project = root / f"{method}.toml"
    rule = svd_rule(svd_layers) if method != "ties" else ""
    project.write_text(f'[models]\nbase = "base"\nft1 = "ft1"\nft2 = "ft2"\n[method]\n{RECIPES[method]}{rule}\n'
                       'dtype = "bfloat16"\n'
                       f'[output]\npath = "out-{method}"\ncopy_tokenizer = false\n')
    arguments = ["merge", str(project), "--force", "--no-progress"] + (["--workers", str(workers)] if workers else [])
    child = ("import json, resource, sys\nfrom mixcli.cli import cli\ntry:\n    cli(json.loads(sys.argv[1]), "
             "standalone_mode=False)\nfinally:\n    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "
             "file=sys.stderr)")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", child, json.dumps(arguments)], check=True,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    return seconds, int(done.stderr.strip().splitlines()[-1]) / 1024


class Model:
    """The tensors of one model folder (one file or shards with an index), read lazily."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        index = folder / "model.safetensors.index.json"
        shards = (json.loads(index.read_text())["weight_map"] if index.is_file()
                  else dict.fromkeys(safe_open(str(folder / "model.safetensors"), "pt").keys(), "model.safetensors"))
        files = {f: safe_open(str(folder / f), "pt") for f in set(shards.values())}
        self.files = {name: files[f] for name, f in shards.items()}

    def shape(self, name):
        return self.files[name].get_slice(name).get_shape()

    def get(self, name):
        return self.files[name].get_tensor(name)


def svd_floor(root: Path, method: str, workers: int, svd_layers: int | None) -> float:
    """Seconds of the SVDs ``method`` performs per matrix, on ``workers`` one-thread workers."""
    import torch

    from mixcli.svd import rank_per_task

    torch.set_num_threads(1)
    models = {n: Model(root / n) for n in ("base", "ft1", "ft2")}
    layers = [f"model.layers.{i}." for i in range(svd_layers)] if svd_layers is not None else None
    names = [k for k in models["base"].files if len(models["base"].shape(k)) == 2 and k not in EXCLUDE
             and (layers is None or any(k.startswith(p) for p in layers))]

    def work(name):
        base = models["base"].get(name).float()
        taus = [models[m].get(name).float() - base for m in ("ft1", "ft2")]
        m, n = base.shape
        r = min(m, n)
        start = time.perf_counter()
        if method == "iso_c":
            torch.linalg.svd(taus[0] + taus[1], full_matrices=False)
        else:
            if method == "iso_cts":
                torch.linalg.svd(taus[0] + taus[1], full_matrices=False)
            for tau in taus:
                torch.linalg.svd(tau, full_matrices=False)
            k = rank_per_task(r, 2)
            torch.linalg.svd(torch.randn(m, 2 * k), full_matrices=False)  # the two polar factors
            torch.linalg.svd(torch.randn(2 * k, n), full_matrices=False)
        return time.perf_counter() - start

    # the engine's policy: large matrices alone with every core, the others one per worker
    from mixcli.tensorwise import INTRA_OP_MIN_SIDE

    large = [k for k in names if min(models["base"].shape(k)) >= INTRA_OP_MIN_SIDE]
    small = [k for k in names if k not in large]
    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(work, small))
    torch.set_num_threads(os.cpu_count() or 1)
    for name in large:
        work(name)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, help="bench_merge.py's root: its three 0.85 B models")
    parser.add_argument("--svd-layers", type=int, help="with --models: layers given the SVD rule (default 16)")
    parser.add_argument("--root", type=Path, default=Path(".bench/singular"))
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--only", default="ties,tsv_merge,iso_c,iso_cts")
    parser.add_argument("--workers", type=int)
    args = parser.parse_args()
    from mixcli.engine import default_workers

    workers = args.workers or default_workers()
    svd_layers = None
    if args.models:
        sys.path.insert(0, str(Path(__file__).parent))
        import bench_merge

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
    print(f"base + 2 experts, bf16; {os.cpu_count()} cores, {workers} workers")
    print(f"{'method':<10} {'merge s':>8} {'peak RSS MiB':>13} {'SVDs alone s':>13} {'ratio':>6} {'load':>10}")
    for method in args.only.split(","):
        load = os.getloadavg()[0]
        seconds, rss = run_merge(root, method, args.workers, svd_layers)
        floor = svd_floor(root, method, workers, svd_layers) if method != "ties" else None
        ratio = f"{seconds / floor:6.2f}" if floor else "     -"
        floor_text = f"{floor:13.1f}" if floor else f"{'-':>13}"
        print(f"{method:<10} {seconds:8.1f} {rss:13.0f} {floor_text} {ratio} {load:>4.1f}-{os.getloadavg()[0]:<4.1f}",
              flush=True)


if __name__ == "__main__":
    main()
