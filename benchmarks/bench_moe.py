"""Time and memory of `mixcli merge` building a 3-expert Mixtral from three ~0.85 B-parameter
bf16 Llamas (mixcli-moe, moe_merge, random gates, experts_per_token 2).

Reuses bench_merge.py's models (built once under --root, default .bench) and its measure():
wall seconds and peak RSS (heap and mapped file pages apart), page cache warm.
mergekit-moe on the same inputs: ~22 s, 3.5 GB peak anonymous memory.

    python benchmarks/bench_moe.py [--root .bench] [--workers N]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_merge import build, measure  # noqa: E402

RECIPE = """
[models]
base = "base"
ft1 = "ft1"
ft2 = "ft2"
[method]
name = "moe_merge"
base = "base"
experts = ["base", "ft1", "ft2"]
experts_per_token = 2
gate_mode = "random"
dtype = "bfloat16"
seed = 0
[output]
path = "out-moe"
shard_size = "2GB"
copy_tokenizer = false
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path(".bench"))
    parser.add_argument("--workers", type=int)
    args = parser.parse_args()
    root = args.root.absolute()
    build(root)
    project = root / "moe.toml"
    project.write_text(RECIPE)
    for folder in ("base", "ft1", "ft2"):  # warm page cache, as in the mergekit measurement
        for shard in (root / folder).glob("*.safetensors"):
            with open(shard, "rb") as f:
                while f.read(1 << 24):
                    pass
    os.sync()
    command = [sys.executable, "-m", "mixcli", "merge", str(project), "--force", "--no-progress"]
    if args.workers:
        command += ["--workers", str(args.workers)]
    result = measure(command, root)
    size = sum(f.stat().st_size for f in (root / "out-moe").glob("*.safetensors"))
    print(f"{'method':<10} {'wall s':>8} {'max RSS MiB':>12} {'peak anon MiB':>14} {'peak file MiB':>14} {'output GB':>10}")
    print(f"{'moe_merge':<10} {result['wall_s']:>8.1f} {result['max_rss_mib']:>12.0f} {result['peak_anon_mib']:>14.0f} "
          f"{result['peak_file_mib']:>14.0f} {size / 1e9:>10.2f}")


if __name__ == "__main__":
    main()
