"""CPU against CUDA: the same merges with `[output] device = "cpu"` and `"cuda"`, printing the
largest differences between the two outputs and the wall time of each merge.

Builds (once, seeded) a base and two fine-tunes of a small Llama layout (hidden 512,
intermediate 1408, 4 layers, vocabulary 8000: 12.8 M parameters) in float32 and bfloat16,
then merges each with several tensor-wise methods on each device through `mixcli merge`.
A row passes when every element agrees within the dtype's tolerance, atol + rtol * |cpu value|
(float32: rtol 1e-5, atol 1e-6; bfloat16: one unit in the last place, rtol 2^-7, atol 1e-6);
"of tol" is the largest difference as a share of that tolerance (at most 1 to pass). Times
are wall seconds of the whole `mixcli merge` (planning, reading, computing, writing), warm.

    python benchmarks/device_check.py [--root .device-check] [--devices cpu,cuda] [--only ties,slerp]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

METHODS = {
    "linear": ("", "ft1 = { path = 'ft1', weight = 0.6 }\nft2 = { path = 'ft2', weight = 0.4 }", ""),
    "task_arithmetic": ("base = 'base'", "base = 'base'\nft1 = 'ft1'\nft2 = 'ft2'", "weight = 0.5"),
    "ties": ("base = 'base'", "base = 'base'\nft1 = 'ft1'\nft2 = 'ft2'", "weight = 0.5\ndensity = 0.5"),
    "dare_ties": ("base = 'base'", "base = 'base'\nft1 = 'ft1'\nft2 = 'ft2'", "weight = 0.5\ndensity = 0.5"),
    "dare_linear": ("base = 'base'", "base = 'base'\nft1 = 'ft1'\nft2 = 'ft2'", "weight = 0.5\ndensity = 0.5"),
    "breadcrumbs_ties": ("base = 'base'", "base = 'base'\nft1 = 'ft1'\nft2 = 'ft2'",
                         "weight = 0.5\ndensity = 0.8"),
    "della": ("base = 'base'", "base = 'base'\nft1 = 'ft1'\nft2 = 'ft2'", "weight = 0.5\ndensity = 0.5"),
    "model_stock": ("base = 'base'", "base = 'base'\nft1 = 'ft1'\nft2 = 'ft2'", ""),
    "slerp": ("base = 'ft1'", "ft1 = 'ft1'\nft2 = 'ft2'", "t = 0.3"),
}
TOLERANCE = {"float32": (1e-5, 1e-6), "bfloat16": (2.0**-7, 1e-6)}


def build(root: Path, dtype_name: str) -> Path:
    import torch
    import transformers

    folder = root / dtype_name
    if (folder / "ft2" / "config.json").is_file():
        return folder
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=8000, hidden_size=512, intermediate_size=1408,
                                      num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                                      max_position_embeddings=256, tie_word_embeddings=False)
    dtype = getattr(torch, dtype_name)
    base = transformers.LlamaForCausalLM(config).to(dtype).eval()
    base.save_pretrained(folder / "base")
    generator = torch.Generator().manual_seed(1)
    for name in ("ft1", "ft2"):
        model = transformers.LlamaForCausalLM(config).to(dtype).eval()
        model.load_state_dict(base.state_dict())
        with torch.no_grad():
            for param in model.parameters():
                param.add_((torch.randn(param.shape, generator=generator) * 0.01).to(dtype))
        model.save_pretrained(folder / name)
    return folder


def merge(folder: Path, method: str, device: str) -> tuple[float, Path]:
    from click.testing import CliRunner

    from mixcli.cli import cli

    base_line, models, params = METHODS[method]
    out = folder / f"out-{method}-{device}"
    project = folder / f"{method}-{device}.toml"
    project.write_text(f"[models]\n{models}\n[method]\nname = '{method}'\n{base_line}\n{params}\nseed = 0\n"
                       f"[output]\npath = '{out.name}'\ndevice = '{device}'\n")
    start = time.perf_counter()
    result = CliRunner().invoke(cli, ["merge", str(project), "--force", "--no-progress"])
    seconds = time.perf_counter() - start
    if result.exit_code != 0:
        raise SystemExit(f"{method} on {device} failed:\n{result.output}{result.exception or ''}")
    return seconds, out


def compare(reference: Path, other: Path, dtype_name: str) -> tuple[float, float, bool]:
    """The largest |difference|, and the largest difference as a share of the tolerance there."""
    from safetensors.torch import load_file

    rtol, atol = TOLERANCE[dtype_name]
    worst_abs = worst_share = 0.0
    a = {k: v for f in sorted(reference.glob("*.safetensors")) for k, v in load_file(f).items()}
    b = {k: v for f in sorted(other.glob("*.safetensors")) for k, v in load_file(f).items()}
    if a.keys() != b.keys():
        return float("inf"), float("inf"), False
    for name in a:
        x, y = a[name].double(), b[name].double()
        diff = (x - y).abs()
        worst_abs = max(worst_abs, float(diff.max()))
        worst_share = max(worst_share, float((diff / (atol + rtol * x.abs())).max()))
    return worst_abs, worst_share, worst_share <= 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(".device-check"))
    parser.add_argument("--devices", default="cpu,cuda")
    parser.add_argument("--only", default=",".join(METHODS))
    parser.add_argument("--dtypes", default="float32,bfloat16")
    args = parser.parse_args()
    import torch

    devices = args.devices.split(",")
    if "cuda" in devices and not torch.cuda.is_available():
        print(f"torch {torch.__version__}: no CUDA device visible; comparing {devices[0]} with itself only")
        devices = [d for d in devices if d != "cuda"]
    else:
        print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
              f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}")
    failures = 0
    print(f"{'dtype':9} {'method':17} " + " ".join(f"{d + ' s':>8}" for d in devices)
          + f" {'max |diff|':>11} {'of tol':>8}  within tolerance")
    for dtype_name in args.dtypes.split(","):
        folder = build(args.root.absolute(), dtype_name)
        for device in devices:  # untimed: imports, plugin loading, CUDA start-up
            merge(folder, "linear", device)
        for method in args.only.split(","):
            runs = {device: merge(folder, method, device) for device in devices}
            times = " ".join(f"{runs[d][0]:8.2f}" for d in devices)
            if len(devices) > 1:
                worst_abs, share, ok = compare(runs[devices[0]][1], runs[devices[1]][1], dtype_name)
                failures += not ok
                print(f"{dtype_name:9} {method:17} {times} {worst_abs:11.3e} {share:8.3f}  {'yes' if ok else 'NO'}")
            else:
                print(f"{dtype_name:9} {method:17} {times}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
