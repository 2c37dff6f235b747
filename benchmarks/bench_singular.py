"""Time and memory of the singular-vector merges (tsv_merge, iso_c, iso_cts) next to ties and
next to their floor: the same SVDs alone, on the same matrices, with the same threads.

Builds (once, seeded) a base and two fine-tunes in the Llama layout of
benchmarks/bench_merge.py (hidden 2048, intermediate 5632, 16 heads, 4 KV heads, bf16) with
``--layers`` layers (default 1: a full-size SVD of every matrix shape of the 0.85 B model;
all 16 layers take hours on 2 cores), embeddings and head excluded from the SVD rule as the
method notes advise for causal LMs. Prints wall seconds and peak RSS of `mixcli merge` for each
method, and the seconds of its SVDs alone (each task vector's SVD and the polar factors'),
run on the engine's worker threads.

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


def run_merge(root: Path, method: str, workers: int | None) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB, mapped input pages included) of one `mixcli merge`."""
    project = root / f"{method}.toml"
    project.write_text(f'[models]\nbase = "base"\nft1 = "ft1"\nft2 = "ft2"\n[method]\n{RECIPES[method]}\n'
                       f'[output]\npath = "out-{method}"\n')
    arguments = ["merge", str(project), "--force", "--no-progress"] + (["--workers", str(workers)] if workers else [])
    child = ("import json, resource, sys\nfrom mixcli.cli import cli\ntry:\n    cli(json.loads(sys.argv[1]), "
             "standalone_mode=False)\nfinally:\n    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "
             "file=sys.stderr)")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", child, json.dumps(arguments)], check=True,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    return seconds, int(done.stderr.strip().splitlines()[-1]) / 1024


def svd_floor(root: Path, method: str, workers: int) -> float:
    """Seconds of the SVDs ``method`` performs per matrix, on ``workers`` one-thread workers."""
    import torch
    from safetensors import safe_open

    from mixcli.svd import rank_per_task

    torch.set_num_threads(1)
    files = {n: safe_open(str(root / n / "model.safetensors"), "pt") for n in ("base", "ft1", "ft2")}
    names = [k for k in files["base"].keys() if len(files["base"].get_slice(k).get_shape()) == 2
             and k not in EXCLUDE]

    def work(name):
        base = files["base"].get_tensor(name).float()
        taus = [files[m].get_tensor(name).float() - base for m in ("ft1", "ft2")]
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

    large = [k for k in names if min(files["base"].get_slice(k).get_shape()) >= INTRA_OP_MIN_SIDE]
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
    parser.add_argument("--root", type=Path, default=Path(".bench/singular"))
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--only", default="ties,tsv_merge,iso_c,iso_cts")
    parser.add_argument("--workers", type=int)
    args = parser.parse_args()
    root = args.root.absolute()
    root.mkdir(parents=True, exist_ok=True)
    build(root, args)
    from mixcli.engine import default_workers

    workers = args.workers or default_workers()
    print(f"{args.layers} layer(s), hidden {args.hidden}, intermediate {args.intermediate}; base + 2 experts, "
          f"bf16; {os.cpu_count()} cores, {workers} workers; load {os.getloadavg()[0]:.1f}")
    print(f"{'method':<10} {'merge s':>8} {'peak RSS MiB':>13} {'SVDs alone s':>13} {'ratio':>6}")
    for method in args.only.split(","):
        seconds, rss = run_merge(root, method, args.workers)
        floor = svd_floor(root, method, workers) if method != "ties" else None
        ratio = f"{seconds / floor:6.2f}" if floor else "     -"
        floor_text = f"{floor:13.1f}" if floor else f"{'-':>13}"
        print(f"{method:<10} {seconds:8.1f} {rss:13.0f} {floor_text} {ratio}", flush=True)


if __name__ == "__main__":
    main()
