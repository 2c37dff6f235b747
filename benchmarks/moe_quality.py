"""Quality of MoE mixing on the model zoo's language experts (mixcli-moe).

Builds (or reuses) the zoo's language family, then, for the MLP-only experts and for the
fully fine-tuned experts, measures greedy exact match on each task's test set for:

* each expert on its own task (the reference: their average);
* the best weight merges (ties, task_arithmetic) through `mixcli merge`;
* MoEs through `mixcli merge` (moe_merge, k = 2): random routers, hidden-state routers
  untuned, and hidden-state routers tuned with `mixcli tune` on a mix of the tasks' training
  data; for the full fine-tunes also with q/k/v and q/k/v/o attention experts;
* the oracle-routing bound: for each task, expert t's tensors in the routed groups and the
  stem elsewhere, evaluated on task t (perfect routing, no MoE needed).

    PYTHONPATH=plugins/mixcli-zoo python benchmarks/moe_quality.py [--root .zoo] [--size full]
        [--steps 1000] [--lr 0.01] [--answer-only] [--stem-lambda 0.3]

``--stem-lambda`` takes the non-expert tensors from task arithmetic with that λ (default:
from the base), in the MoEs and in the oracle bound alike.
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


WEIGHT_MERGE_LAMBDA = {"task_arithmetic": 0.35, "ties": 0.8}  # the demo's values (best of a sweep)


def weight_merge(work: Path, method: str, members, base) -> Path:
    extra = ", density = 0.5" if method == "ties" else ""
    models = "\n".join(f'{m["task"]} = {{ path = "{m["abs"]}", weight = 1.0{extra} }}' for m in members)
    project = work / f"{method}.toml"
    project.write_text(f'[models]\nbase = "{base}"\n{models}\n[method]\nname = "{method}"\nbase = "base"\n'
                       f'lambda = {WEIGHT_MERGE_LAMBDA[method]}\n[output]\npath = "{method}"\n')
    run("merge", project, "--force", "--no-progress")
    return work / method


def moe(work: Path, name: str, members, base, prompts, *, gate_mode: str, modules, tune: dict | None,
        stem_lambda: float | None = None) -> Path:
    project = work / f"{name}.toml"
    text = toml_models(members, base, prompts) + (
        f'[method]\nname = "moe_merge"\nbase = "base"\nexperts_per_token = 2\ngate_mode = "{gate_mode}"\n'
        f'hidden_dtype = "float32"\nmodules = {json.dumps(modules)}\nseed = 0\n'
        + ('stem = "base"\n' if stem_lambda is None else
           f'stem = "task_arithmetic"\nstem_params = {{ lambda = {stem_lambda} }}\n')
        + f'[output]\npath = "{name}"\n')
    if tune:
        text += "[tune]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in tune.items())
    project.write_text(text)
    run("merge", project, "--force", "--no-progress")
    if not tune:
        return work / name
    run("tune", project, "--force", "--no-progress")
    return work / f"{name}-tuned"


ORACLE_GROUPS = {"mlp": ("mlp.",), "mlp+qkv": ("mlp.", "q_proj", "k_proj", "v_proj"),
                 "mlp+qkvo": ("mlp.", "self_attn.")}


def oracle(members, base: Path, tests, groups: list[str], stem_lambda: float | None) -> dict[str, dict]:
    """``{group: scores}`` of perfect routing: on task t, expert t's tensors in the group's
    parameters (``ORACLE_GROUPS``), the stem elsewhere. The models are read once for all groups."""
    import torch
    import transformers

    from mixcli_eval.metrics import exact_match as em

    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    base_sd = {k: v.clone() for k, v in model.state_dict().items()}
    experts = {m["task"]: transformers.AutoModelForCausalLM.from_pretrained(m["abs"], dtype=torch.float32).state_dict()
               for m in members}
    lam = stem_lambda or 0.0
    stem = {k: base_sd[k] + lam * sum(sd[k] - base_sd[k] for sd in experts.values()) for k in base_sd}
    results = {}
    for group in groups:
        parts = ORACLE_GROUPS[group]
        scores = {}
        for task, expert in experts.items():
            model.load_state_dict({k: expert[k] if any(p in k for p in parts) else stem[k] for k in stem})
            data = tests[task]
            scores[task] = em(model, tokenizer, [r["prompt"] for r in data], [r["answer"] for r in data],
                              max_new_tokens=12, batch_size=100)
        results[group] = scores
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path(".zoo"))
    parser.add_argument("--size", default="full", choices=("full", "tiny"))
    parser.add_argument("--work", type=Path, default=Path(".moe-quality"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--kinds", default="mlp_experts,experts")
    parser.add_argument("--answer-only", action="store_true", help="[tune] answer_only = true")
    parser.add_argument("--stem-lambda", type=float, default=None)
    args = parser.parse_args()
    import transformers

    transformers.utils.logging.disable_progress_bar()
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
            "max_length": 64, "eval_fraction": 0.1, "seed": 0, "answer_only": args.answer_only}
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
        groups = ["mlp"]
        if kind == "experts":
            qkv, qkvo = ["mlp", "q_proj", "k_proj", "v_proj"], ["mlp", "q_proj", "k_proj", "v_proj", "o_proj"]
            variants += [("mlp+qkv, hidden, untuned", "hidden", qkv, None),
                         ("mlp+qkv, hidden, tuned", "hidden", qkv, tune),
                         ("mlp+qkvo, hidden, untuned", "hidden", qkvo, None),
                         ("mlp+qkvo, hidden, tuned", "hidden", qkvo, tune)]
            groups += ["mlp+qkv", "mlp+qkvo"]
        for index, (label, mode, modules, tuning) in enumerate(variants):
            record(kind, f"MoE: {label}", moe(kwork, f"moe{index}", members, base, prompts, gate_mode=mode,
                                              modules=modules, tune=tuning, stem_lambda=args.stem_lambda))
        for group, scores in oracle(members, base, tests, groups, args.stem_lambda).items():
            record(kind, f"oracle routing: {group}", None, scores)
    print(f"\n| experts | model | {' | '.join(tasks)} | mean |\n|---|---|{'---|' * len(tasks)}---|")
    for kind, label, scores, mean in table:
        print(f"| {kind} | {label} | " + " | ".join(f"{scores[t]:.3f}" for t in tasks) + f" | {mean:.3f} |")
    print(f"\n{time.time() - start:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
