"""`mixcli evolve` with [search] space = "both": a parameter search, then a layer search over its
best model and the sources, on a toy fitness (minus the squared distance of the candidate's
tensors to a known linear merge; a tensor the candidate lacks counts as its whole size)."""

import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import mixcli
import tiny_models
from conftest import evolve_toy_folder, write_project
from mixcli import plugins

CALLS = []  # the candidates the toy evaluator measured, in order
INTERRUPT_AT = [0]  # send this process SIGINT during that call of the toy evaluator (0: never)


@dataclass
class ToyParams:
    target: str = mixcli.param(help="folder of the model to come close to")


def toy_path_distance(context) -> dict:
    candidate = context.load_model("AutoModelForCausalLM").state_dict()
    target = tiny_models.load_tensors(context.path(context.params["target"]))
    CALLS.append(context.model_path)
    if len(CALLS) == INTERRUPT_AT[0]:
        os.kill(os.getpid(), signal.SIGINT)
    distance = 0.0
    for key, value in target.items():
        other = candidate[key].double() if key in candidate else torch.zeros_like(value, dtype=torch.float64)
        distance += float(((other - value.double()) ** 2).sum())
    return {"distance": distance}


class ToyPlugin:
    @mixcli.hookimpl
    def register_evaluators(register):
        register(mixcli.Evaluator(name="toy_path_distance", summary="squared distance to a target model",
                                  evaluate=toy_path_distance, params=ToyParams, metrics={"distance": "lower"}))


@pytest.fixture
def toy(tmp_path_factory, llama_family):
    folder = evolve_toy_folder(tmp_path_factory, llama_family, ToyPlugin, "evolve-both-toy", 0.7)
    CALLS.clear()

    def project(search: str, name: str = "project.toml", output: str = "out", extra_model: str = "") -> Path:
        return write_project(folder, f"""
[models]
ft1 = {{ path = "{llama_family['ft1']}", weight = 1.0 }}
ft2 = {{ path = "{llama_family['ft2']}", weight = 1.0 }}
{extra_model}
[method]
name = "linear"
[output]
path = "{output}"
[search]
space = "both"
dtype = "float32"
max_path_length = 6
{search}
[[search.fitness]]
evaluator = "toy_path_distance"
metric = "distance"
target = "target"
""", name)

    yield project
    plugins.reset()


def evolve(path, **kwargs):
    from mixcli_evolve.run import evolve_project

    return evolve_project(path, show_progress=False, say=lambda text: None, **kwargs)


def history(folder: Path) -> list[tuple]:
    from mixcli_evolve.search import read_record

    _, entries = read_record(folder)
    return [(e["generation"], e["evaluation"], e["genotype"], e["recipe"], e["fitness"], e["cached"]) for e in entries]


def histories(folder: Path) -> tuple[list, list]:
    """Both records; the layer search's without recipe hashes, which cover the absolute path of
    the parameter search's model and so differ between output folders."""
    return history(folder / "stage-parameters"), [h[:3] + h[4:] for h in history(folder)]


def test_the_budget_is_split_between_the_two_searches_and_never_exceeded(toy):
    outcome, plan = evolve(toy("budget = 9"))
    assert (plan.parameters.settings.budget, plan.layers.settings.budget) == (4, 5)  # ⌊9 · 0.5⌋, the rest
    assert len(CALLS) == 9 and outcome.evaluations == 9
    parameters, layers = history(outcome.folder / "stage-parameters"), history(outcome.folder)
    assert max(h[1] for h in parameters) == 4 and max(h[1] for h in layers) == 5
    assert sum(not h[5] for h in parameters + layers) == 9  # every fresh candidate is one evaluation
    from mixcli_evolve.search import read_record

    first, _ = read_record(outcome.folder / "stage-parameters")
    second, _ = read_record(outcome.folder)
    assert (first["phase"], first["space"]) == ("parameters", "parameters")
    assert (second["phase"], second["space"], second["parameters_budget"]) == ("layers", "layers", 4)
    # the layer search's sources: the parameter search's best model (written inside the search's
    # folder), then the searched models
    model = outcome.folder.resolve() / "stage-parameters" / "model"
    assert second["models"] == ["parameters", "ft1", "ft2"]
    assert plan.layers.genome.models["parameters"] == str(model)
    assert (model / "config.json").is_file()
    # the layer search starts around the parameter search's best model, laid out first: its first
    # candidate takes that model's layers (with input scales near 1, which this fitness on the
    # tensors does not see)
    assert outcome.phases["layers"].entries[0]["fitness"] == outcome.phases["parameters"].best["fitness"]
    CALLS.clear()
    skewed, plan = evolve(toy("budget = 8\nboth_split = 0.25", output="skewed"))
    assert (plan.parameters.settings.budget, plan.layers.settings.budget) == (2, 6)
    assert len(CALLS) == 8 and skewed.evaluations == 8


def test_a_seed_decides_both_histories(toy):
    one, _ = evolve(toy("budget = 8", output="one"))
    two, _ = evolve(toy("budget = 8", output="two"))
    other, _ = evolve(toy("budget = 8\nseed = 4", output="other"))
    assert histories(one.folder)[0] == histories(two.folder)[0]
    assert histories(one.folder)[1] == histories(two.folder)[1]
    assert [h[2] for h in histories(other.folder)[0]] != [h[2] for h in histories(one.folder)[0]]


def test_resume_in_the_layer_search_gives_the_uninterrupted_history_and_best_toml_remerges(toy):
    whole, _ = evolve(toy("budget = 10", output="whole"))
    path = toy("budget = 10", name="stopped.toml", output="stopped")
    CALLS.clear()
    INTERRUPT_AT[0] = 7  # the parameter search's 5, then the second candidate of the layer search
    try:
        stopped, plan = evolve(path)
    finally:
        INTERRUPT_AT[0] = 0
    assert stopped.stopped and stopped.evaluations == 7 and len(stopped.phases["layers"].entries) == 2
    CALLS.clear()
    resumed, plan = evolve(path, resume=True)
    assert len(CALLS) == 3 and not resumed.stopped and resumed.evaluations == 10
    assert histories(resumed.folder) == histories(whole.folder)
    from mixcli_evolve.report import finish

    report = finish(resumed, plan, save=True, show_progress=False)
    assert report["phases"]["parameters"]["evaluations"] == 5 and report["phases"]["layers"]["evaluations"] == 5
    assert report["best"]["fitness"] == max(h[4] for h in history(whole.folder) if h[4] is not None)
    # best.toml: the parameter search's recipe, then the layer path over it, as [[stage]] tables;
    # `mixcli merge` of a copy elsewhere rebuilds the written best model bit for bit
    text = (resumed.folder / "best.toml").read_text()
    assert text.count("[[stage]]") == 2 and 'parameters = "parameters"' in text
    elsewhere = path.parent / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(resumed.folder / "best.toml", elsewhere / "best.toml")
    result = subprocess.run([sys.executable, "-m", "mixcli", "merge", str(elsewhere / "best.toml"), "--no-progress"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    rebuilt, saved = tiny_models.load_tensors(elsewhere / "model"), tiny_models.load_tensors(resumed.folder / "model")
    assert rebuilt.keys() == saved.keys() and all(torch.equal(rebuilt[k], saved[k]) for k in saved)
    from mixcli.evaluation import run_evaluator

    metrics = run_evaluator(plugins.get_registry().evaluators["toy_path_distance"], elsewhere / "model",
                            {"target": str(path.parent / "target")}, "test")
    assert -metrics["distance"] == resumed.best["fitness"]
    # in place it rebuilds the search's own best model (multi-stage projects take no --out), writing
    # only inside the search's folder
    before = sorted(p.name for p in path.parent.iterdir())
    result = subprocess.run([sys.executable, "-m", "mixcli", "merge", str(resumed.folder / "best.toml"), "--force",
                             "--no-progress"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in path.parent.iterdir()) == before
    again = tiny_models.load_tensors(resumed.folder / "model")
    assert all(torch.equal(again[k], saved[k]) for k in saved)
    assert json.loads((resumed.folder / "report.json").read_text())["evaluations"] == 10


def test_resume_in_the_parameter_search_gives_the_uninterrupted_history(toy):
    whole, _ = evolve(toy("budget = 8", output="whole"))
    path = toy("budget = 8", name="early.toml", output="early")
    INTERRUPT_AT[0] = len(CALLS) + 2
    try:
        stopped, _ = evolve(path)
    finally:
        INTERRUPT_AT[0] = 0
    assert stopped.stopped and stopped.evaluations == 2 and "layers" not in stopped.phases
    evolve(path, resume=True)
    assert histories(path.parent / "early") == histories(whole.folder)


def test_validate_checks_a_both_search_without_writing(toy):
    from click.testing import CliRunner

    from mixcli.cli import cli

    path = toy("budget = 6", output="untouched")
    result = CliRunner().invoke(cli, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    assert not (path.parent / "untouched").exists()


@pytest.mark.parametrize("search, extra_model, message", [
    ("budget = 6\nboth_split = 1.0", "", "[search] both_split must be a number between 0 and 1 (exclusive), the "
     "parameter search's share of the budget, got 1.0"),
    ("budget = 6\nboth_split = \"half\"", "", "both_split must be a number between 0 and 1 (exclusive), the "
     "parameter search's share of the budget, got 'half'"),
    ("budget = 1", "", "[search] budget 1 is too small for space = \"both\": each of its two searches needs at "
     "least 1 evaluation; give budget >= 2"),
    ("budget = 6", 'parameters = "{ft1}"', "the name 'parameters' is what space = \"both\" calls the parameter "
     "search's model in the layer search; rename this model"),
])
def test_bad_both_settings_are_one_line_errors(toy, llama_family, search, extra_model, message):
    from click.testing import CliRunner

    from mixcli.cli import cli

    path = toy(search, extra_model=extra_model.format(ft1=llama_family["ft1"]))
    result = CliRunner().invoke(cli, ["validate", str(path)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip().splitlines()[-1].endswith(message)


def test_both_split_with_another_space_is_a_one_line_error(toy):
    from click.testing import CliRunner

    from mixcli.cli import cli

    path = toy("budget = 6\nboth_split = 0.3").parent / "layers.toml"
    path.write_text((path.parent / "project.toml").read_text().replace('space = "both"', 'space = "layers"'))
    result = CliRunner().invoke(cli, ["validate", str(path)])
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1].endswith(
        "[search] both_split applies only to space = \"both\" (the share of the budget the parameter search "
        "gets); remove it")


def test_resuming_with_another_split_of_the_budget_is_a_one_line_error(toy):
    from mixcli.errors import MixcliError

    stopped, _ = evolve(toy("budget = 4"))
    with pytest.raises(MixcliError, match=r"recorded by a different search \(parameters_budget was 2, the project "
                                          r"now gives 3\); resume with the same project"):
        evolve(toy("budget = 6"), resume=True)
    assert len(history(stopped.folder / "stage-parameters")) == 2  # refused before anything ran
