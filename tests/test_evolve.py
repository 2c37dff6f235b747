"""mixcli-evolve: the [search] table, mergekit-evolve's genome decoding, the checks `mixcli
validate` runs before any weight is read."""

import subprocess
import sys

import pytest

from conftest import write_project
from mixcli.core import load_project
from mixcli.errors import MixcliError


def mixcli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "mixcli", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def test_the_plugin_adds_the_evolve_command():
    result = mixcli("evolve", "--help")
    assert result.returncode == 0, result.stderr
    assert "--resume" in result.stdout and "[[search.fitness]]" in result.stdout


FITNESS = """
[[search.fitness]]
evaluator = "perplexity"
metric = "loss"
data = "valid.txt"
"""


def project_text(family, method="linear", search="", models=("ft1", "ft2"), base=False, fitness=FITNESS,
                 extra=""):
    lines = ["[models]"]
    if base:
        lines.append(f'base = "{family["base"]}"')
    for name in models:
        weight = "" if method == "slerp" else ", weight = 1.0"
        lines.append(f'{name} = {{ path = "{family[name]}"{weight} }}')
    lines += ["[method]", f'name = "{method}"'] + (['base = "base"'] if base else [])
    if method == "slerp":
        lines += ['t = 0.5', 'base = "ft1"']
    lines += [extra, "[output]", 'path = "out"', "[search]", "budget = 10", search, fitness]
    return "\n".join(lines) + "\n"


def plan_of(tmp_path, family, **kwargs):
    from mixcli.plugins import get_registry
    from mixcli_evolve.search import plan_search

    (tmp_path / "valid.txt").write_text("12+34=46\n")
    path = write_project(tmp_path, project_text(family, **kwargs))
    project, method = load_project(path)
    return plan_search(project, method, get_registry())


def check_recipe_plans(tmp_path, recipe):
    """A decoded recipe is an ordinary project: it plans like any other."""
    from mixcli.core import prepare
    from mixcli_evolve.recipe import recipe_text

    prepare(tmp_path / "candidate.toml", recipe_text(recipe))


def test_linear_granularity_two_decodes_as_mergekit(tmp_path, llama_family):
    plan = plan_of(tmp_path, llama_family, search="layer_granularity = 2")
    assert plan.genome.shape == (2, 2, 1, 1)
    recipe = plan.genome.decode([0.2, -0.5, 0.7, 0.1])
    assert recipe["slices"] == [
        {"sources": [{"model": "ft1", "layer_range": [0, 2], "weight": 0.2},
                     {"model": "ft2", "layer_range": [0, 2], "weight": 0.5}]},
        {"sources": [{"model": "ft1", "layer_range": [2, 4], "weight": 0.7},
                     {"model": "ft2", "layer_range": [2, 4], "weight": 0.1}]}]
    assert recipe["method"] == {"name": "linear", "dtype": "bfloat16", "normalize": True}
    assert sorted(recipe["models"]) == ["ft1", "ft2"] and "weight" not in recipe["models"]["ft1"]
    check_recipe_plans(tmp_path, recipe)
    initial = plan.genome.decode(plan.genome.initial())
    assert {s["weight"] for piece in initial["slices"] for s in piece["sources"]} == {0.5}


def test_slerp_picks_the_two_largest_weight_genes(tmp_path, llama_family):
    plan = plan_of(tmp_path, llama_family, method="slerp", models=("ft1", "ft2", "ft3"),
                   search='models = ["ft1", "ft2", "ft3"]')
    recipe = plan.genome.decode([1.0, 3.0, 2.0])
    assert recipe["slices"] == [{"sources": [{"model": "ft2", "layer_range": [0, 4]},
                                             {"model": "ft3", "layer_range": [0, 4]}],
                                 "base": "ft2", "t": 0.26894142136999516}]
    assert "base" not in recipe["method"] and "normalize" not in recipe["method"]
    check_recipe_plans(tmp_path, recipe)


def test_ties_with_filters_decodes_as_mergekit(tmp_path, llama_family):
    plan = plan_of(tmp_path, llama_family, method="ties", base=True, search='filters = ["self_attn"]')
    assert plan.genome.shape == (1, 2, 2, 2)
    recipe = plan.genome.decode([0.3, -1.2, 0.4, 0.5, -0.6, 0.9, 0.1, 2.0])
    a, b, base = recipe["slices"][0]["sources"]
    assert a == {"model": "ft1", "layer_range": [0, 4],
                 "weight": [{"filter": "self_attn", "value": 0.3}, {"value": 0.4}],
                 "density": [{"filter": "self_attn", "value": 1.0}, {"value": 0.5}]}
    assert b == {"model": "ft2", "layer_range": [0, 4],
                 "weight": [{"filter": "self_attn", "value": 0.6}, {"value": 0.1}],
                 "density": [{"filter": "self_attn", "value": 0.9}, {"value": 1.0}]}
    assert base == {"model": "base", "layer_range": [0, 4]}  # the base, appended without parameters
    assert recipe["method"] == {"name": "ties", "base": "base", "dtype": "bfloat16", "normalize": True,
                                "int8_mask": True}
    check_recipe_plans(tmp_path, recipe)
    assert plan.genome.initial() == [0.5, 1, 0.5, 1, 0.5, 1, 0.5, 1]


def test_dare_ties_smooth_gives_gradients(tmp_path, llama_family):
    plan = plan_of(tmp_path, llama_family, method="dare_ties", base=True,
                   search="layer_granularity = 2\nsmooth = true")
    recipe = plan.genome.decode([0.3, 0.8, 0.4, 0.5, 0.6, 0.9, 0.1, 1.0])
    assert "slices" not in recipe
    models = recipe["models"]
    assert (models["ft1"]["weight"], models["ft1"]["density"]) == ([0.3, 0.6], [0.8, 0.9])
    assert (models["ft2"]["weight"], models["ft2"]["density"]) == ([0.4, 0.1], [0.5, 1.0])
    assert set(models["base"]) == {"path"}
    assert recipe["method"]["normalize"] is True  # mergekit's default for dare_ties, not the method's
    check_recipe_plans(tmp_path, recipe)


def test_initial_genotype_is_uniform_weights_and_no_pruning(tmp_path, llama_family):
    plan = plan_of(tmp_path, llama_family, method="ties", base=True, models=("ft1", "ft2", "ft3"),
                   search="layer_granularity = 2")
    recipe = plan.genome.decode(plan.genome.initial())
    sources = [s for piece in recipe["slices"] for s in piece["sources"] if s["model"] != "base"]
    assert len(sources) == 6
    assert all(s["weight"] == 1 / 3 and s["density"] == 1.0 for s in sources)
    assert plan.popsize == 4 + 7  # 4 + floor(3 ln 12)


def test_task_arithmetic_defaults_to_no_normalize_and_weight_genes_only(tmp_path, llama_family):
    plan = plan_of(tmp_path, llama_family, method="task_arithmetic", base=True)
    assert plan.genome.genes == ("weight",)
    assert plan.genome.decode(plan.genome.initial())["method"]["normalize"] is False


def test_validate_checks_the_search_table(tmp_path, llama_family):
    (tmp_path / "valid.txt").write_text("12+34=46\n")
    path = write_project(tmp_path, project_text(llama_family, search="layer_granularity = 2"))
    result = mixcli("validate", path, cwd=tmp_path)
    assert result.returncode == 0, result.stderr


BAD = [
    ("layer_granularity = 3", {}, "[search] layer_granularity 3 must divide the models' layer count 4"),
    ("filters = [\"mlp\"]", {"method": "slerp", "models": ("ft1", "ft2")}, "[search]: slerp takes no filters"),
    ("", {"fitness": ""}, "[search]: no [[search.fitness]]"),
    ("", {"fitness": FITNESS.replace('"loss"', '"accuracy"')},
     "[[search.fitness]] #1: unknown metric 'accuracy' for evaluator 'perplexity'"),
    ("", {"fitness": FITNESS.replace("valid.txt", "test.txt")},
     "[[search.fitness]] #1: the fitness would use the test split (data = 'test.txt')"),
    ("budget = 0", {}, None),
    ("strategy = \"cmaa\"", {}, "[search] strategy: unknown search strategy 'cmaa' (did you mean 'cma'?)"),
    ("executor = \"threads\"", {}, "[search] executor must be one of 'serial', 'process', 'ray'"),
    ("sigmaa = 0.2", {}, "[search]: unknown key 'sigmaa' (did you mean 'sigma0'?)"),
    ("threads = -1", {}, "[search] threads must be a whole number >= 0, got -1"),
]


@pytest.mark.parametrize("search, kwargs, message", BAD)
def test_bad_search_settings_are_one_line_errors(tmp_path, llama_family, search, kwargs, message):
    (tmp_path / "valid.txt").write_text("12+34=46\n")
    text = project_text(llama_family, search=search, **kwargs)
    if search == "budget = 0":
        text = text.replace("budget = 10\nbudget = 0", "budget = 0")
        message = "[search] budget must be a whole number of evaluations >= 1, got 0"
    path = write_project(tmp_path, text)
    with pytest.raises(MixcliError) as error:
        load_project(path)
    assert str(error.value) == f"project.toml: {message}" or str(error.value).startswith(f"project.toml: {message}")


def test_a_missing_budget_and_test_data_without_the_flag_fail_validate_in_one_line(tmp_path, llama_family):
    (tmp_path / "valid.txt").write_text("12+34=46\n")
    path = write_project(tmp_path, project_text(llama_family).replace("budget = 10\n", ""))
    result = mixcli("validate", path, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == ["Error: project.toml: [search] budget is missing; give the most "
                                                  "fitness evaluations the search may use, e.g. budget = 100"]
    flagged = project_text(llama_family, search="allow_test_split = true",
                           fitness=FITNESS.replace("valid.txt", "test.txt"))
    (tmp_path / "test.txt").write_text("1+1=2\n")
    result = mixcli("validate", write_project(tmp_path, flagged), cwd=tmp_path)
    assert result.returncode == 0, result.stderr


def test_the_fitness_may_not_be_the_report(tmp_path, llama_family):
    (tmp_path / "valid.txt").write_text("12+34=46\n")
    text = project_text(llama_family) + '[[evaluation]]\nevaluator = "perplexity"\ndata = "valid.txt"\n'
    with pytest.raises(MixcliError, match=r"\[\[search.fitness\]\] #1: the fitness is the same as "
                                          r"project.toml: \[\[evaluation\]\] #1, the report"):
        load_project(write_project(tmp_path, text))


def dfs_plan(tmp_path, family, search):
    from mixcli.plugins import get_registry
    from mixcli_evolve.search import plan_search

    (tmp_path / "valid.txt").write_text("12+34=46\n")
    path = write_project(tmp_path, project_text(family, search='space = "layers"\ndtype = "float32"\n' + search))
    project, method = load_project(path)
    return plan_search(project, method, get_registry())


def test_dfs_all_on_with_unit_scales_is_the_concatenation_of_the_sources(tmp_path, llama_family):
    import torch

    import tiny_models
    from mixcli.inmemory import build_state_dict
    from mixcli.project import project_from_dict

    plan = dfs_plan(tmp_path, llama_family, 'scales = "none"')
    genome = plan.genome
    assert genome.shape == (8, 0) and genome.binary() == list(range(8))
    assert genome.decode(genome.initial())["method"]["layers"] == [{"model": "ft1", "layer": i} for i in range(4)]
    recipe = genome.decode([1.0] * 8)
    assert recipe["method"]["layers"] == ([{"model": "ft1", "layer": i} for i in range(4)]
                                          + [{"model": "ft2", "layer": i} for i in range(4)])
    built = build_state_dict(project_from_dict(recipe, tmp_path))
    sources = [tiny_models.load_tensors(llama_family["ft1"]), tiny_models.load_tensors(llama_family["ft2"])]
    for k in range(8):
        source, layer = sources[k // 4], k % 4
        names = [n for n in source if n.startswith(f"model.layers.{layer}.")]
        assert names and all(torch.equal(built[n.replace(f"layers.{layer}.", f"layers.{k}.")], source[n])
                             for n in names)
    assert torch.equal(built["model.embed_tokens.weight"], sources[0]["model.embed_tokens.weight"])
    assert torch.equal(built["lm_head.weight"], sources[1]["lm_head.weight"])


def test_dfs_pair_scales_and_length_limits(tmp_path, llama_family):
    plan = dfs_plan(tmp_path, llama_family, "repeats = 2\nmax_path_length = 5")
    genome = plan.genome
    assert genome.shape == (16, 4)  # 2 models x 4 layers x 2 repeats; a scale per model pair
    x = [-1.0] * 16 + [1.0, 0.5, 0.25, 2.0]  # scales ft1->ft1, ft1->ft2, ft2->ft1, ft2->ft2
    x[3] = x[4] = x[8 + 2] = 1.0  # ft1 layer 3, ft2 layer 0, then (repeat 2) ft1 layer 2
    steps = genome.decode(x)["method"]["layers"]
    assert steps == [{"model": "ft1", "layer": 3}, {"model": "ft2", "layer": 0, "scale": 0.5},
                     {"model": "ft1", "layer": 2, "scale": 0.25}]
    assert genome.decode([1.0] * 6 + [-1.0] * 10 + [1.0] * 4) is None  # 6 layers > max_path_length
    assert genome.decode([-1.0] * 16 + [1.0] * 4) is None  # an empty path


def test_a_dfs_search_scores_infeasible_paths_worst_without_building_them(tmp_path, llama_family):
    import json

    import tiny_models
    from mixcli_evolve.run import evolve_project

    (tmp_path / "valid.txt").write_text("12+34=46\n7*8=56\n")
    path = write_project(tmp_path, project_text(llama_family).replace(
        "budget = 10", 'budget = 6\nspace = "layers"\ndtype = "float32"\nmax_path_length = 4\nsigma0 = 0.6\nseed = 2'))
    outcome, plan = evolve_project(path, show_progress=False, say=lambda text: None)
    rows = [json.loads(line) for line in (tmp_path / "out" / "record.jsonl").read_text().splitlines()[1:]]
    assert [r["evaluation"] for r in rows if not r["cached"]] == list(range(1, 7))
    infeasible = [r for r in rows if r.get("infeasible")]
    assert infeasible and all(r["fitness"] is None and r["recipe"] is None for r in infeasible)
    assert all(sum(g > 0 for g in r["genotype"][:8]) > 4 for r in infeasible)
    from mixcli_evolve.report import finish

    finish(outcome, plan, save=True, show_progress=False)
    assert tiny_models.logits(tmp_path / "out" / "model").shape[-1] == len(tiny_models.tokenizer())
