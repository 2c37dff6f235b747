"""Quality of MoE mixing on the model zoo's language experts (mixcli-moe).

Builds (or reuses) the zoo's language family, then, for the MLP-only experts and for the
fully fine-tuned experts, measures greedy exact match on each task's test set for:

* each expert on its own task (the reference: their average);
* the best weight merges (ties, task_arithmetic) through `mixcli merge`;
* MoEs through `mixcli merge` (moe_merge, k = 2): random routers, hidden-state routers
  untuned, and hidden-state routers tuned with `mixcli tune` on a mix of the tasks' training
  data; for the full fine-tunes also with q/k/v attention experts.

    PYTHONPATH=plugins/mixcli-zoo python benchmarks/moe_quality.py [--root .zoo] [--size full]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

from click.testing import CliRunner


def cli():
    from mixcli.cli import cli as group  # plugin commands such as `tune` come with it

    return group


def run(*args) -> None:
    result = CliRunner().invoke(cli(), [*map(str, args)])
    if result.exit_code:
        raise SystemExit(f"mixcli {' '.join(map(str, args))} failed: {result.output}{result.exception!r}")


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def exact_match(folder: Path, tests: dict[str, list[dict]]) -> dict[str, float]:
    import torch
    import transformers

    from mixcli.plugins import register_architectures
    from mixcli_eval.metrics import exact_match as em

    register_architectures()
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    return {task: em(model, tokenizer, [r["prompt"] for r in data], [r["answer"] for r in data],
                     max_new_tokens=12, batch_size=100) for task, data in tests.items()}


def toml_models(members, base, prompts) -> str:
    lines = [f'base = "{base}"']
    for m in members:
        lines.append(f'{m["task"]} = {{ path = "{m["abs"]}", positive_prompts = {json.dumps(prompts[m["task"]])} }}')
    return "[models]\n" + "\n".join(lines) + "\n"


def weight_merge(work: Path, method: str, members, base) -> Path:
    extra = ", density = 0.5" if method == "ties" else ""
    models = "\n".join(f'{m["task"]} = {{ path = "{m["abs"]}", weight = 1.0{extra} }}' for m in members)
    project = work / f"{method}.toml"
    project.write_text(f'[models]\nbase = "{base}"\n{models}\n[method]\nname = "{method}"\nbase = "base"\n'
                       f'lambda = 1.0\n[output]\npath = "{method}"\n')
    run("merge", project, "--force", "--no-progress")
    return work / method


def moe(work: Path, name: str, members, base, prompts, *, gate_mode: str, modules, tune: dict | None,
        stem: str = "base") -> Path:
    project = work / f"{name}.toml"
    text = toml_models(members, base, prompts) + (
        f'[method]\nname = "moe_merge"\nbase = "base"\nexperts_per_token = 2\ngate_mode = "{gate_mode}"\n'
        f'hidden_dtype = "float32"\nmodules = {json.dumps(modules)}\nstem = "{stem}"\nseed = 0\n'
        f'[output]\npath = "{name}"\n')
    if tune:
        text += "[tune]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in tune.items())
    project.write_text(text)
    run("merge", project, "--force", "--no-progress")
    if not tune:
        return work / name
    run("tune", project, "--force", "--no-progress")
    return work / f"{name}-tuned"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path(".zoo"))
    parser.add_argument("--size", default="full", choices=("full", "tiny"))
    parser.add_argument("--work", type=Path, default=Path(".moe-quality"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--kinds", default="mlp_experts,experts")
    args = parser.parse_args()
    from mixcli_zoo.build import build_zoo

    start = time.time()
    root = args.root.absolute()
    manifest = build_zoo(root, args.size, 0, families=("language",))["language"]
    base = root / manifest["base"]
    data = manifest["data"]
    tasks = [m["task"] for m in manifest["experts"]]
    tests = {t: rows(root / data[t]["test"]) for t in tasks}
    train = {t: rows(root / data[t]["train"]) for t in tasks}
    prompts = {t: [r["prompt"] for r in train[t][:16]] for t in tasks}
    work = args.work.absolute()
    work.mkdir(parents=True, exist_ok=True)
    mix = [r for t in tasks for r in random.Random(t).sample(train[t], min(150, len(train[t])))]
    random.Random(0).shuffle(mix)
    (work / "tune.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mix))
    tune = {"data": str(work / "tune.jsonl"), "steps": args.steps, "batch_size": 16, "lr": args.lr,
            "max_length": 64, "eval_fraction": 0.1, "seed": 0}
    table = []

    def record(kind, label, folder, own=None):
        scores = own if own is not None else exact_match(folder, tests)
        mean = sum(scores.values()) / len(scores)
        table.append((kind, label, scores, mean))
        print(f"{kind:<12} {label:<34} " + " ".join(f"{t}={scores[t]:.3f}" for t in tasks) + f"  mean={mean:.3f}",
              flush=True)
        return mean

    for kind in args.kinds.split(","):
        members = [dict(m, abs=str(root / m["path"])) for m in manifest[kind]]
        kwork = work / kind
        kwork.mkdir(exist_ok=True)
        own = {m["task"]: exact_match(root / m["path"], {m["task"]: tests[m["task"]]})[m["task"]] for m in members}
        record(kind, "experts (own task)", None, own)
        record(kind, "base", base)
        for method in ("task_arithmetic", "ties"):
            record(kind, f"weight merge: {method}", weight_merge(kwork, method, members, base))
        variants = [("random routers, untuned", "random", ["mlp"], None),
                    ("hidden routers, untuned", "hidden", ["mlp"], None),
                    ("hidden routers, tuned", "hidden", ["mlp"], tune)]
        if kind == "experts":
            qkv = ["mlp", "q_proj", "k_proj", "v_proj"]
            variants += [("mlp+qkv, hidden, untuned", "hidden", qkv, None),
                         ("mlp+qkv, hidden, tuned", "hidden", qkv, tune)]
        for index, (label, mode, modules, tuning) in enumerate(variants):
            record(kind, f"MoE: {label}", moe(kwork, f"moe{index}", members, base, prompts, gate_mode=mode,
                                              modules=modules, tune=tuning))
    print(f"\n| experts | model | {' | '.join(tasks)} | mean |\n|---|---|{'---|' * len(tasks)}---|")
    for kind, label, scores, mean in table:
        print(f"| {kind} | {label} | " + " | ".join(f"{scores[t]:.3f}" for t in tasks) + f" | {mean:.3f} |")
    print(f"\n{time.time() - start:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
