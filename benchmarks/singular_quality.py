"""Quality of the singular merges (TSV-M, Iso-C, Iso-CTS) against task arithmetic and TIES on
the model zoo, with every coefficient chosen on the zoo's VALIDATION split and reported on its
TEST split.

For each family (vision: accuracy with the experts' heads; language: greedy exact match), each
method is merged through `mixcli merge` (to a temporary folder) at every point of a small grid
(λ for task arithmetic, λ × density for TIES, alpha for tsv_merge, scaling_factor for iso_c and
iso_cts), measured on the validation split; the point with the best validation mean is then
measured once on the test split. Printed: the validation curve of each method, the chosen
coefficients with their test accuracy, and a measurement of why the singular merges gain (or
do not) at this scale: per weight matrix, the share of each task vector's energy kept by its
top r/T singular components (what TSV-M keeps of each task), the overlap of the tasks' top
singular subspaces (the interference TSV-M and Iso-CTS remove; 0 = orthogonal, "chance" = two
random subspaces of that size) and the mean cosine between task vectors; each task's
validation score with its task vector alone and with all of them (the interference in the
function the model computes); and, for singular_projection_merging (one expert: the one best
on its own task), that task's validation score for each k and rank.

    python benchmarks/singular_quality.py [--size quick|full] [--root ZOO] [--families vision,language]
        [--json results.json]

The zoo is built (or reused) under ``--root`` (default ``zoo/quick``, or ``zoo`` for full, as
`mixcli demo`); the full zoo costs about 35 CPU-minutes to build.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

# name of the method -> grid of its parameters (TOML names); the first best point wins ties
GRIDS = {
    "task_arithmetic": [{"lambda": x} for x in (0.1, 0.2, 0.3, 0.5, 0.7, 1.0)],
    "ties": [{"density": d, "lambda": x} for d, x in itertools.product((0.1, 0.2, 0.5), (0.5, 0.7, 1.0, 1.5))],
    "tsv_merge": [{"alpha": x} for x in (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)],
    "iso_c": [{"scaling_factor": x} for x in (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0)],
    "iso_cts": [{"scaling_factor": x} for x in (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0)],
}
BASELINES = ("task_arithmetic", "ties")
TARGETS = ("tsv_merge", "iso_cts")
TARGET_POINTS = 0.05  # the target: each at least 5 points above the best baseline


def project_text(manifest: dict, root: Path, method: str, params: dict, out: Path, experts=None) -> str:
    from mixcli.tomlwrite import inline

    lines = ["[models]", f"base = {inline(str((root / manifest['base']).resolve()))}"]
    lines += [f"{e['task']} = {inline(str((root / e['path']).resolve()))}" for e in manifest["experts"]
              if experts is None or e["task"] in experts]
    lines += ["", "[method]", f"name = {inline(method)}", 'base = "base"']
    if method in BASELINES:
        params = {"weight": 1.0, **params}  # every task vector counts once, as in the demo projects
    lines += [f"{key} = {inline(value)}" for key, value in params.items()]
    lines += ["", "[output]", f"path = {inline(str(out))}", ""]
    return "\n".join(lines)


def merge(manifest: dict, root: Path, method: str, params: dict, work: Path, experts=None) -> Path:
    """``method`` of the base and the experts (all, or those whose task is in ``experts``)."""
    from click.testing import CliRunner

    from mixcli.cli import cli

    project = work / "project.toml"
    out = work / "merged"
    project.write_text(project_text(manifest, root, method, params, out, experts))
    result = CliRunner().invoke(cli, ["merge", str(project), "--force", "--no-progress"])
    if result.exit_code:
        raise SystemExit(f"mixcli merge ({method} {params}) failed: {result.output}{result.exception!r}")
    return out


def measure(folder: Path, evaluator: str, settings: dict) -> dict:
    from mixcli_zoo.demo import evaluate

    return evaluate(folder, evaluator, settings)


def shown(params: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in params.items())


def choose(family: str, manifest: dict, root: Path, work: Path, log) -> dict:
    """{method: {"params", "validation" (curve), "test"}} for one family."""
    from mixcli_zoo.demo import family_evaluation

    evaluator, on_validation, _ = family_evaluation(family, manifest, root, split="validation")
    _, on_test, _ = family_evaluation(family, manifest, root, split="test")
    results = {}
    for method, grid in GRIDS.items():
        curve = []
        for params in grid:
            t0 = time.time()
            score = measure(merge(manifest, root, method, params, work), evaluator, on_validation)["mean"]
            curve.append((params, score))
            log(f"  {family} {method:15s} {shown(params):24s} validation {score:.3f}  ({time.time() - t0:.0f} s)")
        best_params, best_score = max(curve, key=lambda point: point[1])  # max keeps the first of equals
        test = measure(merge(manifest, root, method, best_params, work), evaluator, on_test)
        results[method] = {"params": best_params, "validation_mean": best_score,
                           "validation_curve": [[p, s] for p, s in curve], "test": test}
        log(f"  {family} {method}: chosen {shown(best_params)} -> test {test['mean']:.3f}")
    return results


def references(family: str, manifest: dict, root: Path) -> dict:
    """Test means of the base and of each expert on its own task."""
    from mixcli_zoo.demo import family_evaluation

    evaluator, on_test, per_task = family_evaluation(family, manifest, root, split="test")
    base = measure(root / manifest["base"], evaluator, on_test)["mean"]
    own = [measure(root / e["path"], evaluator, per_task[e["task"]])[e["task"]] for e in manifest["experts"]]
    return {"base": base, "individual experts": sum(own) / len(own)}


def interference(manifest: dict, root: Path) -> list[dict]:
    """Per 2-D weight matrix with non-zero task vectors: energy kept at rank r/T, subspace
    overlap of the tasks' top-r/T left singular vectors (and its chance level), mean cosine."""
    import torch
    from safetensors.torch import load_file

    from mixcli.svd import rank_per_task

    def state(path):
        return load_file(str(root / path / "model.safetensors"))

    base = state(manifest["base"])
    experts = [state(e["path"]) for e in manifest["experts"]]
    rows = []
    for name, w0 in base.items():
        if w0.dim() != 2:
            continue
        taus = [e[name].float() - w0.float() for e in experts]
        if not any(bool(t.any()) for t in taus):
            continue  # frozen in every expert (embeddings, heads)
        m, r = w0.shape[0], min(w0.shape)
        k = rank_per_task(r, len(taus))
        bases, energy = [], []
        for tau in taus:
            u, s, _ = torch.linalg.svd(tau, full_matrices=False)
            energy.append(float((s[:k] ** 2).sum() / (s ** 2).sum().clamp_min(1e-30)))
            bases.append(u[:, :k])
        pairs = list(itertools.combinations(range(len(taus)), 2))
        overlap = sum(float((bases[i].T @ bases[j]).pow(2).sum()) / k for i, j in pairs) / len(pairs)
        flat = [t.flatten() for t in taus]
        cosine = sum(float(torch.nn.functional.cosine_similarity(flat[i], flat[j], dim=0)) for i, j in pairs) / len(pairs)
        rows.append({"tensor": name, "shape": list(w0.shape), "k": k, "energy_at_k": sum(energy) / len(energy),
                     "overlap": overlap, "overlap_chance": k / m, "cosine": cosine})
    return rows


def function_interference(family: str, manifest: dict, root: Path, work: Path, lambdas) -> dict:
    """{λ: {task: (validation accuracy of base + λ·τ_task alone, of base + λ·Σ τ)}} on each
    task's own validation data: how much the other task vectors cost a task in the function
    the model computes, whatever their angle in weight space."""
    from mixcli_zoo.demo import family_evaluation

    evaluator, on_validation, per_task = family_evaluation(family, manifest, root, split="validation")
    out = {}
    for lam in lambdas:
        params = {"lambda": lam}
        together = measure(merge(manifest, root, "task_arithmetic", params, work), evaluator, on_validation)
        out[lam] = {}
        for expert in manifest["experts"]:
            task = expert["task"]
            alone = measure(merge(manifest, root, "task_arithmetic", params, work, {task}), evaluator,
                            per_task[task])[task]
            out[lam][task] = (alone, together[task])
    return out


def projection_curve(family: str, manifest: dict, root: Path, work: Path) -> tuple[str, float, list]:
    """singular_projection_merging of the expert best on its own task (its validation score
    is the reference): that task's validation score for each k and rank (top-k subspaces of
    the pretrained weights, "low", or the rest, "high"); full rank would be the fine-tune."""
    from mixcli_zoo.demo import family_evaluation

    evaluator, _, per_task = family_evaluation(family, manifest, root, split="validation")
    own = {e["task"]: measure(root / e["path"], evaluator, per_task[e["task"]])[e["task"]] for e in manifest["experts"]}
    task = max(own, key=own.get)
    width = manifest["hyperparameters"]["hidden"]
    curve = []
    for rank, k in itertools.product(("low", "high"), (width // 16, width // 8, width // 4, width // 2)):
        folder = merge(manifest, root, "singular_projection_merging", {"k": k, "rank": rank}, work, {task})
        curve.append(({"k": k, "rank": rank}, measure(folder, evaluator, per_task[task])[task]))
    return task, own[task], curve


def report(family: str, refs: dict, results: dict, rows: list[dict], functional: dict, projection: tuple,
           print_=print) -> dict:
    metric = "accuracy" if family == "vision" else "exact match"
    print_(f"\n{family}: mean {metric} (coefficient chosen on validation, reported on test)")
    print_(f"  {'base':36s} test {refs['base']:.3f}")
    print_(f"  {'individual experts':36s} test {refs['individual experts']:.3f}")
    for method, r in results.items():
        print_(f"  {method + ' (' + shown(r['params']) + ')':36s} test {r['test']['mean']:.3f}   "
               f"validation {r['validation_mean']:.3f}")
    best = max(results[m]["test"]["mean"] for m in BASELINES)
    verdict = {}
    for method in TARGETS:
        gain = results[method]["test"]["mean"] - best
        verdict[method] = gain
        print_(f"  {method} - best of task arithmetic / TIES: {gain * 100:+.1f} points "
               f"({'meets' if gain >= TARGET_POINTS else 'misses'} the +{TARGET_POINTS * 100:.0f} target)")
    print_(f"\n{family}: validation mean over each grid (accuracy vs coefficient)")
    for method, r in results.items():
        print_(f"  {method:15s} " + "  ".join(f"[{shown(p)}] {s:.3f}" for p, s in r["validation_curve"]))
    print_(f"\n{family}: task vectors per matrix (energy kept at rank k = r/T; overlap of the tasks' top-k "
           "left singular subspaces, 1 = the same, chance = random subspaces; mean pairwise cosine)")
    print_(f"  {'tensor':52s} {'shape':>10s} {'k':>3s} {'energy@k':>8s} {'overlap':>7s} {'chance':>6s} {'cosine':>6s}")
    for row in rows:
        print_(f"  {row['tensor']:52s} {'x'.join(map(str, row['shape'])):>10s} {row['k']:3d} "
               f"{row['energy_at_k']:8.3f} {row['overlap']:7.3f} {row['overlap_chance']:6.3f} {row['cosine']:6.3f}")
    if rows:
        n = len(rows)
        print_(f"  {'mean over matrices':52s} {'':>10s} {'':>3s} {sum(r['energy_at_k'] for r in rows) / n:8.3f} "
               f"{sum(r['overlap'] for r in rows) / n:7.3f} {sum(r['overlap_chance'] for r in rows) / n:6.3f} "
               f"{sum(r['cosine'] for r in rows) / n:6.3f}")
    print_(f"\n{family}: each task's validation {metric} with its task vector alone (base + λ·τ_t) and with "
           "all of them (base + λ·Σ τ)")
    for lam, tasks in functional.items():
        cells = "  ".join(f"{task} {alone:.3f}/{together:.3f}" for task, (alone, together) in tasks.items())
        mean_alone = sum(a for a, _ in tasks.values()) / len(tasks)
        mean_together = sum(t for _, t in tasks.values()) / len(tasks)
        print_(f"  λ {lam}: {cells}  mean {mean_alone:.3f}/{mean_together:.3f}")
    task, reference, curve = projection
    (chosen, score) = max(curve, key=lambda point: point[1])
    print_(f"\n{family}: singular_projection_merging of the {task} expert, {task} validation {metric} by k and "
           f"rank (the expert itself: {reference:.3f}); best on validation: {shown(chosen)}")
    print_("  " + "  ".join(f"[{shown(p)}] {v:.3f}" for p, v in curve))
    return verdict


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="quick", choices=("quick", "full", "tiny"))
    p.add_argument("--root", type=Path, help="zoo root [default: zoo/quick, or zoo for full]")
    p.add_argument("--families", default="vision,language")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the figures here")
    a = p.parse_args(argv)
    from mixcli_zoo.build import build_zoo

    root = a.root or (Path("zoo") if a.size == "full" else Path("zoo") / a.size)
    families = tuple(f for f in a.families.split(",") if f)
    manifests = build_zoo(root, size=a.size, seed=a.seed, families=families, log=print)
    started = time.time()
    figures = {}
    with tempfile.TemporaryDirectory(prefix="singular-quality-") as tmp:
        for family, manifest in manifests.items():
            refs = references(family, manifest, root)
            results = choose(family, manifest, root, Path(tmp), lambda line: print(line, file=sys.stderr))
            rows = interference(manifest, root)
            lambdas = sorted({results["task_arithmetic"]["params"]["lambda"], 1.0})
            functional = function_interference(family, manifest, root, Path(tmp), lambdas)
            projection = projection_curve(family, manifest, root, Path(tmp))
            figures[family] = {"references": refs, "methods": results, "interference": rows,
                               "alone_and_together": {str(k): v for k, v in functional.items()},
                               "projection": {"task": projection[0], "expert": projection[1], "curve": projection[2]},
                               "gain_over_best_baseline": report(family, refs, results, rows, functional,
                                                                 projection)}
    print(f"\n({time.time() - started:.0f} s; zoo {root}, size {a.size}, seed {a.seed})")
    if a.json:
        a.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
