"""Quality of MoE mixing on two language families (mixcli-moe).

* ``--family zoo``: the model zoo's language experts (``--root`` a built zoo, e.g. the quick
  zoo; built there with ``--size`` when missing);
* ``--family llama``: the second family of ``benchmarks/llama_family.py`` (a char-level Llama
  base without a tokenizer template and four FULL fine-tunes on tasks sharing one alphabet).

Greedy exact match per task on the test split (``--split validation`` for choosing settings)
of: each expert on its own task (the reference: their mean), the base, and MoEs (moe_merge,
k = 2, ``--modules``) with random and hidden-state routers, untuned and tuned by
`mixcli tune` with the ``[tune]`` DEFAULTS (the project names only ``data``: 100
prompt/answer rows, 25 per task, from the training split). ``--sweep`` instead tunes the
hidden MoE over a grid of learning rates and step counts and prints the validation means
(how the defaults were chosen). ``--figure PATH`` copies the tuned hidden MoE's loss curve.
``--merges`` adds the weight merges and the oracle-routing bound (zoo kinds of experts).

    PYTHONPATH=plugins/mixcli-zoo python benchmarks/moe_quality.py --family zoo --root /work/zoo-shared/quick
    PYTHONPATH=plugins/mixcli-zoo python benchmarks/moe_quality.py --family llama --root .llama-family
    PYTHONPATH=plugins/mixcli-zoo python benchmarks/moe_quality.py --family llama --sweep --split validation
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
        stem_lambda: float | None = None, extra: str = "") -> Path:
    """Merge (and, with ``tune``, tune with exactly that [tune] table) one MoE; its folder."""
    project = work / f"{name}.toml"
    text = toml_models(members, base, prompts) + (
        f'[method]\nname = "moe_merge"\nbase = "base"\nexperts_per_token = 2\ngate_mode = "{gate_mode}"\n'
        f'hidden_dtype = "float32"\nmodules = {json.dumps(modules)}\nseed = 0\n{extra}'
        + ('stem = "base"\n' if stem_lambda is None else
           f'stem = "task_arithmetic"\nstem_params = {{ lambda = {stem_lambda} }}\n')
        + f'[output]\npath = "{name}"\n')
    if tune:
        text += "[tune]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in tune.items())
    project.write_text(text)
    if not (work / name / "config.json").is_file() or not tune:
        run("merge", project, "--force", "--no-progress")
    if not tune:
        return work / name
    run("tune", project, "--force", "--no-progress")
    return work / tune.get("output", f"{name}-tuned")


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


def load_family(args) -> tuple[Path, dict]:
    """(root, manifest) of the family; built when missing (never rebuilt over another's build)."""
    root = args.root.absolute()
    if args.family == "llama":
        sys.path.insert(0, str(Path(__file__).parent))
        from llama_family import build

        return root, build(root)
    manifest = root / "language" / "manifest.json"
    if manifest.is_file():
        return root, json.loads(manifest.read_text())
    from mixcli_zoo.build import build_zoo

    return root, build_zoo(root, args.size, 0, families=("language",))["language"]


def tuning_rows(train: dict, count: int) -> list[dict]:
    """``count`` prompt/answer rows drawn evenly from the tasks' training splits, shuffled."""
    per = count // len(train)
    mix = [r for t, rows_of in train.items() for r in random.Random(t).sample(rows_of, min(per, len(rows_of)))]
    random.Random(0).shuffle(mix)
    return mix


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="zoo", choices=("zoo", "llama"))
    parser.add_argument("--root", type=Path, default=None, help="zoo root, or the llama family's folder")
    parser.add_argument("--size", default="quick", choices=("quick", "full", "tiny"))
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--split", default="test", choices=("test", "validation"))
    parser.add_argument("--rows", type=int, default=100, help="tuning rows (prompt/answer), evenly over the tasks")
    parser.add_argument("--modules", default="mlp", help="comma-separated moe_merge modules")
    parser.add_argument("--kind", default="experts", help="zoo: experts or mlp_experts")
    parser.add_argument("--tune", default="", help="extra [tune] keys as JSON, e.g. '{\"steps\": 300}'")
    parser.add_argument("--sweep", action="store_true", help="tune the hidden MoE over --lrs x --steps-grid")
    parser.add_argument("--lrs", default="0.003,0.01,0.03")
    parser.add_argument("--steps-grid", default="100,300")
    parser.add_argument("--batches", default="16", help="sweep: batch sizes")
    parser.add_argument("--merges", action="store_true", help="also weight merges and oracle routing")
    parser.add_argument("--only", default="", help="run only the MoE variants whose label contains this")
    parser.add_argument("--oracle-only", action="store_true", help="only the experts and oracle routing")
    parser.add_argument("--stem-lambda", type=float, default=None)
    parser.add_argument("--figure", type=Path, default=None, help="copy the tuned hidden MoE's tune_loss.png here")
    args = parser.parse_args()
    args.root = args.root or Path(".llama-family" if args.family == "llama" else ".zoo")
    import torch
    import transformers

    # one thread: these models are tiny, and on a shared machine spinning threads cost 10x
    torch.set_num_threads(1)
    transformers.utils.logging.disable_progress_bar()
    start = time.time()
    root, manifest = load_family(args)
    base = root / manifest["base"]
    data = manifest["data"]
    members = [dict(m, abs=str(root / m["path"])) for m in manifest[args.kind if args.family == "zoo" else "experts"]]
    tasks = [m["task"] for m in members]
    tests = {t: rows(root / data[t][args.split]) for t in tasks}
    train = {t: rows(root / data[t]["train"]) for t in tasks}
    prompts = {t: [r["prompt"] for r in train[t][:16]] for t in tasks}
    work = (args.work or Path(f".moe-quality/{args.family}")).absolute()
    work.mkdir(parents=True, exist_ok=True)
    (work / "tune.jsonl").write_text("".join(json.dumps(r) + "\n" for r in tuning_rows(train, args.rows)))
    defaults = {"data": str(work / "tune.jsonl"), **json.loads(args.tune or "{}")}
    modules = args.modules.split(",")
    table = []
    label_of = f"{args.family}/{args.split}"

    def record(label, folder, own=None):
        scores = own if own is not None else exact_match(folder, tests)
        mean = sum(scores.values()) / len(scores)
        reference = table[0][3] if table else mean
        table.append((label_of, label, scores, mean))
        print(f"{label_of:<16} {label:<44} " + " ".join(f"{t}={scores[t]:.3f}" for t in tasks)
              + f"  mean={mean:.3f} ({100 * mean / reference:.1f} % of experts)", flush=True)
        return mean

    own = {m["task"]: exact_match(Path(m["abs"]), {m["task"]: tests[m["task"]]})[m["task"]] for m in members}
    record("experts (own task)", None, own)
    if args.oracle_only:
        groups = ["mlp", "mlp+qkv", "mlp+qkvo"]
        for group, scores in oracle(members, base, tests, groups, args.stem_lambda).items():
            record(f"oracle routing: {group}", None, scores)
    elif args.sweep:
        moe(work, "sweep", members, base, prompts, gate_mode="hidden", modules=modules, tune=None)
        for batch in map(int, args.batches.split(",")):
            for lr in map(float, args.lrs.split(",")):
                for steps in map(int, args.steps_grid.split(",")):
                    tune = dict(defaults, lr=lr, steps=steps, batch_size=batch, output=f"sweep-{lr:g}-{steps}-{batch}")
                    folder = moe(work, "sweep", members, base, prompts, gate_mode="hidden", modules=modules,
                                 tune=tune)
                    record(f"MoE hidden, tuned lr {lr:g} steps {steps} batch {batch}", folder)
    else:
        if not args.only:
            record("base", base)
        if args.merges:
            for method in ("task_arithmetic", "ties"):
                record(f"weight merge: {method}", weight_merge(work, method, members, base))
        variants = [("random routers, untuned", "random", None, ""),
                    ("hidden routers (mergekit residual), untuned", "hidden", None, 'hidden_source = "residual"\n'),
                    ("hidden routers, untuned", "hidden", None, ""),
                    ("random routers, tuned (defaults)", "random", defaults, ""),
                    ("hidden routers (mergekit residual), tuned", "hidden", defaults, 'hidden_source = "residual"\n'),
                    ("hidden routers, tuned (defaults)", "hidden", defaults, "")]
        for index, (label, mode, tuning, extra) in enumerate(variants):
            if args.only not in label:
                continue
            folder = moe(work, f"moe{index}", members, base, prompts, gate_mode=mode, modules=modules,
                         tune=tuning, stem_lambda=args.stem_lambda, extra=extra)
            record(f"MoE {'+'.join(modules)}: {label}", folder)
            if args.figure and tuning and label.startswith("hidden routers, tuned"):
                args.figure.parent.mkdir(parents=True, exist_ok=True)
                args.figure.write_bytes((folder / "tune_loss.png").read_bytes())
        if args.merges:
            groups = ["mlp"] + (["mlp+qkv", "mlp+qkvo"] if len(modules) > 1 else [])
            for group, scores in oracle(members, base, tests, groups, args.stem_lambda).items():
                record(f"oracle routing: {group}", None, scores)
    print(f"\n| family/split | model | {' | '.join(tasks)} | mean | % of experts |\n|---|---|{'---|' * len(tasks)}---|---|")
    for family, label, scores, mean in table:
        print(f"| {family} | {label} | " + " | ".join(f"{scores[t]:.3f}" for t in tasks)
              + f" | {mean:.3f} | {100 * mean / table[0][3]:.1f} |")
    print(f"\n{time.time() - start:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
