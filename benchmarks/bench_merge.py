"""Time and memory of mixcli merges of three ~0.85 B-parameter bf16 Llamas.

Builds (once, seeded) three Llama-layout models -- hidden 2048, intermediate 5632, 16 layers,
16 heads, 4 KV heads, vocabulary 32000, untied head: 0.853 B parameters, 1.7 GB each in
500 MB shards -- then runs `mixcli merge` for linear, ties, dare_ties and slerp (``--only all``
adds nuslerp, multislerp, karcher, sce, nearswap, arcee_fusion, ram and ramplus_tl) with the
page cache warm, printing wall seconds, peak RSS (heap and mapped file pages apart) and the
input read rate, and the 1-minute load average before and after the run (the machine may be
shared: a load above the core count slows every row).

    python benchmarks/bench_merge.py [--root .bench] [--only linear,ties|all] [--workers N] [--repeat N]
                                     [--mergekit /path/to/mergekit-venv/bin]

With ``--mergekit`` the same recipes (scalar parameters only) also run through that venv's
``mergekit-yaml`` (default 5B shard, ``--no-copy-tokenizer``, as in the anchors), one row each,
on the same cores: mixcli runs one tensor per core (one torch thread each), mergekit one
tensor at a time with torch's default thread count (every core).
"""

from __future__ import annotations

import argparse
import json
import tomllib
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

SHAPE = dict(hidden=2048, intermediate=5632, layers=16, heads=16, kv_heads=4, vocab=32000)

RECIPES = {
    "linear": """
[models]
base = {{ path = "base", weight = 0.4 }}
ft1 = {{ path = "ft1", weight = 0.3 }}
ft2 = {{ path = "ft2", weight = 0.3 }}
[method]
name = "linear"
dtype = "bfloat16"
""",
    "ties": """
[models]
base = "base"
ft1 = {{ path = "ft1", weight = 0.5, density = 0.5 }}
ft2 = {{ path = "ft2", weight = 0.5, density = 0.5 }}
[method]
name = "ties"
base = "base"
dtype = "bfloat16"
""",
    "dare_ties": """
[models]
base = "base"
ft1 = {{ path = "ft1", weight = 0.5, density = 0.5 }}
ft2 = {{ path = "ft2", weight = 0.5, density = 0.5 }}
[method]
name = "dare_ties"
base = "base"
dtype = "bfloat16"
seed = 0
""",
    "slerp": """
[models]
ft1 = "ft1"
ft2 = "ft2"
[method]
name = "slerp"
base = "ft1"
dtype = "bfloat16"
t = [{{ filter = "self_attn", value = [0, 0.5, 0.3, 0.7, 1] }}, {{ filter = "mlp", value = [1, 0.5, 0.7, 0.3, 0] }}, {{ value = 0.5 }}]
""",
    "nuslerp": """
[models]
base = "base"
ft1 = {{ path = "ft1", weight = 0.6 }}
ft2 = {{ path = "ft2", weight = 0.4 }}
[method]
name = "nuslerp"
base = "base"
dtype = "bfloat16"
""",
    "multislerp": """
[models]
base = "base"
ft1 = {{ path = "ft1", weight = 0.6 }}
ft2 = {{ path = "ft2", weight = 0.4 }}
[method]
name = "multislerp"
base = "base"
dtype = "bfloat16"
""",
    "karcher": """
[models]
base = "base"
ft1 = "ft1"
ft2 = "ft2"
[method]
name = "karcher"
dtype = "bfloat16"
""",
    "sce": """
[models]
base = "base"
ft1 = "ft1"
ft2 = "ft2"
[method]
name = "sce"
base = "base"
dtype = "bfloat16"
""",
    "nearswap": """
[models]
base = "base"
ft1 = "ft1"
[method]
name = "nearswap"
base = "base"
t = 0.0001
dtype = "bfloat16"
""",
    "arcee_fusion": """
[models]
base = "base"
ft1 = "ft1"
[method]
name = "arcee_fusion"
base = "base"
dtype = "bfloat16"
""",
    "ram": """
[models]
base = "base"
ft1 = "ft1"
ft2 = "ft2"
[method]
name = "ram"
base = "base"
dtype = "bfloat16"
""",
    "ramplus_tl": """
[models]
base = "base"
ft1 = "ft1"
ft2 = "ft2"
[method]
name = "ramplus_tl"
base = "base"
dtype = "bfloat16"
""",
}
DEFAULT = "linear,ties,dare_ties,slerp"  # --only all: every recipe


def tensor_shapes():
    h, i, v, kv = SHAPE["hidden"], SHAPE["intermediate"], SHAPE["vocab"], SHAPE["hidden"] // SHAPE["heads"] * SHAPE["kv_heads"]
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for layer in range(SHAPE["layers"]):
        p = f"model.layers.{layer}."
        shapes.update({p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                       p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                       p + "mlp.down_proj.weight": (h, i), p + "input_layernorm.weight": (h,),
                       p + "post_attention_layernorm.weight": (h,)})
    return shapes


def build(root: Path) -> None:
    import torch

    from mixcli.safetensors_io import ShardedWriter

    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": SHAPE["hidden"],
              "intermediate_size": SHAPE["intermediate"], "num_hidden_layers": SHAPE["layers"],
              "num_attention_heads": SHAPE["heads"], "num_key_value_heads": SHAPE["kv_heads"],
              "vocab_size": SHAPE["vocab"], "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
              "tie_word_embeddings": False, "dtype": "bfloat16"}
    shapes = tensor_shapes()
    for index, name in enumerate(("base", "ft1", "ft2")):
        folder = root / name
        if (folder / "config.json").exists():
            continue
        print(f"building {folder} ...", flush=True)
        folder.mkdir(parents=True, exist_ok=True)
        writer = ShardedWriter(folder, [(n, "BF16", s) for n, s in shapes.items()], 500 * 10**6)
        for t_index, (tensor_name, shape) in enumerate(shapes.items()):
            base = torch.randn(shape, generator=torch.Generator().manual_seed(t_index)) * 0.02
            if index:
                noise = torch.randn(shape, generator=torch.Generator().manual_seed(index * 100003 + t_index))
                base += 0.02 * base.std() * noise
            writer.write(tensor_name, base.to(torch.bfloat16))
        writer.close()
        (folder / "config.json").write_text(json.dumps(config, indent=2))


def measure(command: list[str], cwd: Path) -> dict:
    """Run ``command``; wall time and peak RSS / anonymous / file-backed memory of the child."""
    peaks = {"rss": 0, "anon": 0, "file": 0}
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    child = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stop = threading.Event()

    def poll():
        keys = {"VmRSS:": "rss", "RssAnon:": "anon", "RssFile:": "file"}
        while not stop.is_set():
            try:
                for line in Path(f"/proc/{child.pid}/status").read_text().splitlines():
                    parts = line.split()
                    if parts and parts[0] in keys:
                        peaks[keys[parts[0]]] = max(peaks[keys[parts[0]]], int(parts[1]) * 1024)
            except (FileNotFoundError, ProcessLookupError):
                break
            stop.wait(0.02)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    stop.set()
    watcher.join()
    stderr = child.stderr.read().decode()
    if status != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{stderr}")
    return {"wall_s": wall, "max_rss_mib": usage.ru_maxrss / 1024, "peak_anon_mib": peaks["anon"] / 2**20,
            "peak_file_mib": peaks["file"] / 2**20, "load_before": load_before, "load_after": os.getloadavg()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path(".bench"))
    parser.add_argument("--only", default=DEFAULT, help="comma-separated recipes, or 'all'")
    parser.add_argument("--workers", type=int)
    parser.add_argument("--repeat", type=int, default=1, help="runs per method; the table shows each")
    parser.add_argument("--mergekit", type=Path, help="bin folder of a venv with mergekit 0.1.5: time it too")
    args = parser.parse_args()
    root = args.root.absolute()
    build(root)
    inputs = {name: sum(f.stat().st_size for f in (root / name).glob("*.safetensors")) for name in ("base", "ft1", "ft2")}
    print(f"{os.cpu_count()} cores")
    print(f"{'method':<12} {'wall s':>8} {'max RSS MiB':>12} {'peak anon MiB':>14} {'peak file MiB':>14} "
          f"{'input GB/s':>11} {'load':>10}")
    for method in (list(RECIPES) if args.only == "all" else args.only.split(",")):
        recipe = RECIPES[method].format()
        project = root / f"{method}.toml"
        project.write_text(recipe + f'[output]\npath = "out-{method}"\nshard_size = "2GB"\ncopy_tokenizer = false\n')
        read = sum(size for name, size in inputs.items() if name in recipe)
        for _ in range(args.repeat):
            result = run_once(root, method, project, args.workers)
            print(row(method, result, read), flush=True)
            if args.mergekit:
                print(row("  mergekit", run_mergekit(root, method, recipe, args.mergekit), read), flush=True)


def row(label: str, result: dict, read: int) -> str:
    return (f"{label:<12} {result['wall_s']:>8.1f} {result['max_rss_mib']:>12.0f} {result['peak_anon_mib']:>14.0f} "
            f"{result['peak_file_mib']:>14.0f} {read / 1e9 / result['wall_s']:>11.2f} "
            f"{result['load_before']:>4.1f}-{result['load_after']:<4.1f}")


def mergekit_recipe(recipe: str, root: Path) -> dict:
    """The mergekit YAML (as JSON, which YAML reads) of one of the recipes above."""
    project = tomllib.loads(recipe)
    method = dict(project["method"])
    name, base, dtype = method.pop("name"), method.pop("base", None), method.pop("dtype")
    if any(isinstance(v, (list, dict)) for v in method.values()):
        raise SystemExit(f"{name}: only scalar parameters translate to mergekit here")
    out = {"merge_method": name, "dtype": dtype, "models": []}
    if base:
        out["base_model"] = str(root / project["models"][base])
    if method:
        out["parameters"] = method
    for model, ref in project["models"].items():
        if model == base:
            continue
        ref = {"path": ref} if isinstance(ref, str) else dict(ref)
        entry = {"model": str(root / ref.pop("path"))}
        if ref:
            entry["parameters"] = ref
        out["models"].append(entry)
    return out


def run_mergekit(root: Path, method: str, recipe: str, bin_dir: Path) -> dict:
    config = root / f"{method}.mergekit.yml"
    config.write_text(json.dumps(mergekit_recipe(recipe, root), indent=2))
    warm(root)
    out = root / f"out-mergekit-{method}"
    shutil.rmtree(out, ignore_errors=True)
    os.sync()
    return measure([str(bin_dir / "mergekit-yaml"), str(config), str(out), "--no-copy-tokenizer",
                    "--random-seed", "0"], root)


def warm(root: Path) -> None:
    for folder in ("base", "ft1", "ft2"):  # warm page cache, as in the mergekit measurements
        for shard in (root / folder).glob("*.safetensors"):
            with open(shard, "rb") as f:
                while f.read(1 << 24):
                    pass


def run_once(root: Path, method: str, project: Path, workers: int | None) -> dict:
    warm(root)
    # deleting the previous run's output is not part of a merge: do it, and flush it, untimed
    shutil.rmtree(root / f"out-{method}", ignore_errors=True)
    os.sync()
    command = [sys.executable, "-m", "mixcli", "merge", str(project), "--no-progress"]
    if workers:
        command += ["--workers", str(workers)]
    return measure(command, root)


if __name__ == "__main__":
    main()
