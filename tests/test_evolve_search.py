"""The search loop of `mixcli evolve` on a toy problem with a known best recipe: the fitness is
minus the squared distance of the candidate's tensors to a linear merge of known weights."""

import os
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

CALLS = []  # the folders the toy evaluator measured, in order
THREADS = []  # torch's thread count during each of those measurements
MODELS = []  # the resident models measured (kept alive, so no address can be reused)
INTERRUPT_AT = [0]  # send this process SIGINT during that call of the toy evaluator (0: never)
TARGET_SHARE = 0.7  # the known optimum: 0.7 of ft1 and 0.3 of ft2


@dataclass
class ToyParams:
    target: str = mixcli.param(help="folder of the model to come close to")


def toy_distance(context) -> dict:
    candidate = context.load_model("AutoModelForCausalLM").state_dict()  # a resident model, or a folder
    MODELS.append(context.model)
    target = tiny_models.load_tensors(context.path(context.params["target"]))
    CALLS.append(context.model_path)
    THREADS.append(torch.get_num_threads())
    if len(CALLS) == INTERRUPT_AT[0]:
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while a candidate is measured
    return {"distance": sum(float(((candidate[k].double() - target[k].double()) ** 2).sum()) for k in target)}


class FixedStrategy:
    """Asks the generations of ``GENERATIONS`` in turn (a strategy registered by a plugin)."""

    GENERATIONS: list = []
    told: list = []

    def __init__(self, popsize):
        self.popsize = popsize
        self.asked = iter(self.GENERATIONS)

    def ask(self):
        return next(self.asked)

    def tell(self, genotypes, losses):
        FixedStrategy.told.append(losses)


class ToyPlugin:
    @mixcli.hookimpl
    def register_evaluators(register):
        register(mixcli.Evaluator(name="toy_distance", summary="squared distance to a target model",
                                  evaluate=toy_distance, params=ToyParams, metrics={"distance": "lower"}))

    @mixcli.hookimpl
    def register_search_strategies(register):
        register(mixcli.SearchStrategy(name="fixed", summary="fixed generations",
                                       create=lambda x0, sigma0, popsize, seed, binary=(): FixedStrategy(popsize)))


@pytest.fixture
def toy(tmp_path_factory, llama_family):
    """The toy plugin registered; a folder with the target model; a function writing projects."""
    folder = evolve_toy_folder(tmp_path_factory, llama_family, ToyPlugin, "evolve-toy", TARGET_SHARE)
    CALLS.clear()

    def project(search: str, name: str = "project.toml", output: str = "out") -> Path:
        return write_project(folder, f"""
[models]
ft1 = {{ path = "{llama_family['ft1']}", weight = 1.0 }}
ft2 = {{ path = "{llama_family['ft2']}", weight = 1.0 }}
[method]
name = "linear"
[output]
path = "{output}"
[search]
dtype = "float32"
{search}
[[search.fitness]]
evaluator = "toy_distance"
metric = "distance"
target = "target"
""", name)

    yield project
    plugins.reset()


def evolve(path, **kwargs):
    from mixcli_evolve.run import evolve_project

    outcome, plan = evolve_project(path, show_progress=False, say=lambda text: None, **kwargs)
    return outcome, plan


def history(folder: Path) -> list[tuple]:
    from mixcli_evolve.search import read_record

    _, entries = read_record(folder)
    return [(e["generation"], e["evaluation"], e["genotype"], e["recipe"], e["fitness"], e["cached"]) for e in entries]


def share(recipe: dict) -> float:
    a, b = recipe["slices"][0]["sources"]
    return a["weight"] / (a["weight"] + b["weight"])


def test_the_search_finds_the_known_best_recipe_within_its_budget(toy):
    outcome, plan = evolve(toy("budget = 40\nseed = 1"))
    assert plan.popsize == 6 and outcome.evaluations == 40 and len(CALLS) == 40
    first = outcome.entries[0]["fitness"]
    best = outcome.best
    # stated tolerance: the best recipe's share of ft1 within 0.02 of 0.7, its distance < 5% of the first's
    assert abs(share(outcome.recipes[best["recipe"]]) - TARGET_SHARE) < 0.02
    assert -best["fitness"] < 0.05 * -first


def test_the_budget_is_never_exceeded_and_seeds_decide_the_history(toy):
    outcome, plan = evolve(toy("budget = 8"))  # a population of 6: the second generation is cut to 2
    assert len(CALLS) == 8 and outcome.evaluations == 8 and len(outcome.entries) == 8
    assert [e["generation"] for e in outcome.entries] == [0] * 6 + [1] * 2
    same, _ = evolve(toy("budget = 8", output="again"))
    assert history(outcome.folder) == history(same.folder)
    other, _ = evolve(toy("budget = 8\nseed = 5", output="other"))
    assert [h[2] for h in history(other.folder)] != [h[2] for h in history(outcome.folder)]


def test_small_models_are_scored_on_one_thread_unless_threads_says_otherwise(toy):
    before = torch.get_num_threads()
    THREADS.clear()
    evolve(toy("budget = 2"))
    assert THREADS == [1, 1]  # the tiny models' matrices are far below mixcli_evolve.fitness.SMALL_MATRIX
    THREADS.clear()
    evolve(toy("budget = 2\nthreads = 3", output="three"))
    assert THREADS == [3, 3]
    assert torch.get_num_threads() == before  # the search leaves the process's threads as they were


def test_the_candidates_of_a_search_are_computed_into_one_model(toy):
    MODELS.clear()
    outcome, _ = evolve(toy("budget = 4"))
    assert len(MODELS) == 4 and all(model is MODELS[0] for model in MODELS)
    MODELS.clear()
    # each in-place candidate scores as its recipe merged afresh: the toy optimum's distances
    from mixcli.inmemory import build_model
    from mixcli.project import project_from_dict


    for entry in outcome.entries:
        recipe = outcome.recipes[entry["recipe"]]
        fresh = build_model(project_from_dict(recipe, outcome.folder.parent)).state_dict()
        target = tiny_models.load_tensors(outcome.folder.parent / "target")
        distance = sum(float(((fresh[k].double() - target[k].double()) ** 2).sum()) for k in target)
        assert entry["fitness"] == -distance


def test_identical_recipes_are_scored_once_and_the_strategy_hook_is_used(toy):
    a, b, c, d = [0.5, 0.5], [0.2, 0.6], [0.3, 0.3], [0.9, 0.1]
    e = [-0.2, -0.6]  # weights fold to |x|: e decodes to b's recipe
    FixedStrategy.GENERATIONS = [[a, b, a], [e, c, d]]
    FixedStrategy.told = []
    outcome, plan = evolve(toy('budget = 3\nstrategy = "fixed"'))
    rows = history(outcome.folder)
    assert [(r[1], r[5]) for r in rows] == [(1, False), (2, False), (2, True), (2, True), (3, False)]
    assert len(CALLS) == 3  # a, b, c; d is past the budget
    assert rows[2][4] == rows[0][4] and rows[3][4] == rows[1][4]
    assert len(FixedStrategy.told) == 1  # the cut generation is not told
    assert rows[4][3] != rows[0][3]  # c merges like a once normalised, but it is another recipe: scored


def test_ctrl_c_stops_after_the_candidate_and_resume_gives_the_uninterrupted_history(toy, llama_family):
    whole, _ = evolve(toy("budget = 10", output="whole"))
    CALLS.clear()
    path = toy("budget = 10", name="stopped.toml", output="stopped")
    INTERRUPT_AT[0] = 4
    try:
        stopped, plan = evolve(path)
    finally:
        INTERRUPT_AT[0] = 0
    assert stopped.stopped and stopped.evaluations == 4 and len(CALLS) == 4
    best_text = (stopped.folder / "best.toml").read_text()
    assert f"fitness {stopped.best['fitness']!r}" in best_text
    CALLS.clear()
    resumed, _ = evolve(path, resume=True)
    assert len(CALLS) == 6 and not resumed.stopped
    assert history(resumed.folder) == history(whole.folder)
    from mixcli_evolve.report import finish

    report = finish(resumed, plan, save=True, show_progress=False)
    assert report["best"]["fitness"] == max(h[4] for h in history(whole.folder))
    # the best recipe is a plain project: `mixcli merge` rebuilds the scored candidate bit for bit
    again = stopped.folder / "again"
    result = subprocess.run([sys.executable, "-m", "mixcli", "merge", str(stopped.folder / "best.toml"), "--out",
                             str(again), "--no-progress"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    rebuilt, saved = tiny_models.load_tensors(again), tiny_models.load_tensors(stopped.folder / "model")
    assert rebuilt.keys() == saved.keys() and all(torch.equal(rebuilt[k], saved[k]) for k in saved)
    from mixcli.evaluation import run_evaluator

    metrics = run_evaluator(plugins.get_registry().evaluators["toy_distance"], again,
                            {"target": str(path.parent / "target")}, "test")
    assert -metrics["distance"] == resumed.best["fitness"]
    assert (stopped.folder / "fitness.png").read_bytes()[:4] == b"\x89PNG"


def test_resume_refuses_a_record_of_another_search(toy):
    evolve(toy("budget = 2"))
    from mixcli.errors import MixcliError

    with pytest.raises(MixcliError, match=r"recorded by a different search \(seed was 0, the project now gives 3\)"):
        evolve(toy("budget = 2\nseed = 3"), resume=True)
    with pytest.raises(MixcliError, match="holds a search record; pass --resume to continue it or --force"):
        evolve(toy("budget = 2"))


def test_resume_after_a_kill_cut_the_last_record_line_keeps_resuming(toy):
    whole, _ = evolve(toy("budget = 9", output="whole"))
    path = toy("budget = 4", name="cut.toml", output="cut")
    stopped, _ = evolve(path)
    record = stopped.folder / "record.jsonl"
    record.write_text(record.read_text()[:-40])  # a kill in the middle of the last entry
    for budget in (6, 9):  # each resume appends to what the one before left
        evolve(toy(f"budget = {budget}", name="cut.toml", output="cut"), resume=True)
    lines = record.read_text().splitlines()
    assert all(line.startswith("{") and line.endswith("}") for line in lines)
    assert history(stopped.folder) == history(whole.folder)


def test_resuming_with_a_budget_below_the_record_is_a_one_line_error(toy):
    from mixcli.errors import MixcliError

    evolve(toy("budget = 5"))
    with pytest.raises(MixcliError, match=r"holds 5 evaluations, more than \[search\] budget = 3; give a budget "
                                          r"of at least 5"):
        evolve(toy("budget = 3"), resume=True)


def test_a_candidate_whose_fitness_is_nan_is_never_the_best(toy):
    a, b, c = [0.5, 0.5], [0.2, 0.6], [0.9, 0.1]
    FixedStrategy.GENERATIONS = [[a, b, c]]
    FixedStrategy.told = []
    INTERRUPT_AT[0] = 0

    scores = iter([float("nan"), 2.0, 3.0])

    def diverging(context):
        CALLS.append(context.model_path)
        return {"distance": -next(scores)}

    registry = plugins.get_registry()
    evaluator = registry.evaluators["toy_distance"]
    import dataclasses

    registry.evaluators["toy_distance"] = dataclasses.replace(evaluator, evaluate=diverging)
    try:
        outcome, _ = evolve(toy('budget = 3\nstrategy = "fixed"'))
    finally:
        registry.evaluators["toy_distance"] = evaluator
    rows = history(outcome.folder)
    assert [r[4] for r in rows] == [None, 2.0, 3.0]
    assert outcome.best["fitness"] == 3.0 and outcome.best["evaluation"] == 3
    assert "fitness 3.0" in (outcome.folder / "best.toml").read_text()
    assert FixedStrategy.told[0][0] == max(FixedStrategy.told[0])  # ranked worst


def test_an_output_path_that_is_a_file_is_a_one_line_error(toy):
    path = toy("budget = 2", output="taken")
    (path.parent / "taken").write_text("the user's notes\n")
    from click.testing import CliRunner

    from mixcli.cli import cli

    result = CliRunner().invoke(cli, ["evolve", str(path), "--no-progress"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip().splitlines()[-1].endswith("taken: is a file, not a folder; choose another "
                                                           "[output] path (or --out) for the search")
    assert (path.parent / "taken").read_text() == "the user's notes\n"
