"""`mixcli evolve` end to end, and its executors: serial, a local process pool and Ray (a real
local Ray cluster) give the same history for the same seed."""

import json
import subprocess
import sys

import pytest

import tiny_models
from conftest import write_project


def project(folder, family, search: str, output: str = "out", name: str = "project.toml"):
    (folder / "valid.txt").write_text("12+34=46\n7*8=56\n99-9=90\n")
    (folder / "report.txt").write_text("1+2=3\n45+5=50\n")
    return write_project(folder, f"""
[models]
base = "{family['base']}"
ft1 = {{ path = "{family['ft1']}", weight = 1.0 }}
ft2 = {{ path = "{family['ft2']}", weight = 1.0 }}
[method]
name = "ties"
base = "base"
[output]
path = "{output}"
[search]
dtype = "float32"
layer_granularity = 2
{search}
[[search.fitness]]
evaluator = "perplexity"
metric = "loss"
data = "valid.txt"
[[evaluation]]
evaluator = "perplexity"
data = "report.txt"
""", name)


def history(folder):
    from mixcli_evolve.search import read_record

    _, entries = read_record(folder)
    return [(e["evaluation"], e["genotype"], e["recipe"], e["fitness"], e["metrics"]) for e in entries]


def test_mixcli_evolve_writes_the_best_model_its_report_and_chart(tmp_path, llama_family):
    path = project(tmp_path, llama_family, "budget = 3\npopsize = 4")
    result = subprocess.run([sys.executable, "-m", "mixcli", "evolve", str(path), "--no-progress"],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "top recipes (3 evaluations of 3)" in result.stdout
    out = tmp_path / "out"
    report = json.loads((out / "report.json").read_text())
    assert report["evaluations"] == 3 and len(report["top"]) == 3
    assert report["best"]["fitness"] == max(h[3] for h in history(out))
    assert report["report"][0]["evaluator"] == "perplexity" and report["report"][0]["metrics"]["loss"] > 0
    logits = tiny_models.logits(out / "model")  # stock transformers loads and runs the best model
    assert logits.shape[-1] == len(tiny_models.tokenizer())
    assert (out / "fitness.png").read_bytes()[:4] == b"\x89PNG"
    again = subprocess.run([sys.executable, "-m", "mixcli", "evolve", str(path), "--no-progress"],
                           capture_output=True, text=True, cwd=tmp_path)
    assert again.returncode == 1
    assert again.stderr.strip().splitlines() == [f"Error: {out}: holds a search record; pass --resume to "
                                                 "continue it or --force to start over"]


@pytest.fixture(scope="module")
def serial_history(tmp_path_factory, llama_family):
    from mixcli_evolve.run import evolve_project

    folder = tmp_path_factory.mktemp("serial")
    outcome, _ = evolve_project(project(folder, llama_family, "budget = 5\npopsize = 4"), show_progress=False)
    return history(outcome.folder)


def test_a_process_pool_gives_the_serial_history(tmp_path, llama_family, serial_history):
    from mixcli_evolve.run import evolve_project

    path = project(tmp_path, llama_family, 'budget = 5\npopsize = 4\nexecutor = "process"\nworkers = 2')
    outcome, _ = evolve_project(path, show_progress=False)
    assert history(outcome.folder) == serial_history


def test_ray_actors_give_the_serial_history(tmp_path, llama_family, serial_history):
    import ray

    from mixcli_evolve.run import evolve_project

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        path = project(tmp_path, llama_family, 'budget = 5\npopsize = 4\nexecutor = "ray"\nworkers = 2')
        outcome, _ = evolve_project(path, show_progress=False)
        assert history(outcome.folder) == serial_history
    finally:
        ray.shutdown()
