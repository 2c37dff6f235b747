"""The recipe written into every output (`mixcli.toml`) rebuilds the model bit for bit from any
working directory; the dry run shows every resolved parameter, per model."""

import json
import os
from pathlib import Path

import tomli
import torch
from click.testing import CliRunner

import tiny_models
from mixcli.cli import cli


def run(*args, code=0):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == code, result.output + repr(result.exception)
    return result


def relative_project(tmp_path, family) -> Path:
    folder = tmp_path / "proj"
    folder.mkdir()
    rel = {name: os.path.relpath(path, folder) for name, path in family.items()}
    project = folder / "project.toml"
    project.write_text(f"""# a commented recipe
[models]
base = "{rel['base']}"
a = {{ path = "{rel['ft1']}", weight = 0.7 }}
b = {{ path = "{rel['ft2']}", weight = 0.3, density = [0.2, 0.9] }}

[method]
name = "dare_ties"
base = "base"
seed = 7
density = 0.5
lambda = 0.9

[[method.overrides]]
match = "mlp"
lambda = 1.1

[output]
path = "out"
dtype = "bfloat16"
""")
    return project


def test_recipe_in_the_output_rebuilds_it_bit_for_bit_from_elsewhere(tmp_path, llama_family, monkeypatch):
    project = relative_project(tmp_path, llama_family)
    monkeypatch.chdir(project.parent)
    run("merge", "project.toml", "--no-progress")
    out = project.parent / "out"
    recipe = (out / "mixcli.toml").read_text()
    data = tomli.loads(recipe)
    assert data["models"]["base"] == str(llama_family["base"])
    assert data["models"]["a"] == {"path": str(llama_family["ft1"]), "weight": 0.7}
    assert data["output"] == {"path": ".", "dtype": "bfloat16"}
    original = tomli.loads(project.read_text())
    for key in ("method", "output"):
        data[key].pop("path", None), original[key].pop("path", None)
    assert data["method"] == original["method"] and data["output"] == original["output"]
    assert recipe.strip() in (out / "README.md").read_text()

    elsewhere = tmp_path / "elsewhere" / "deeper"
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    run("merge", out / "mixcli.toml", "--out", "again", "--no-progress")
    again = elsewhere / "again"
    first, second = tiny_models.load_tensors(out), tiny_models.load_tensors(again)
    assert sorted(first) == sorted(second) and len(first) == 39
    for name, tensor in first.items():
        assert tensor.dtype == second[name].dtype and tensor.shape == second[name].shape
        assert torch.equal(tensor.contiguous().view(torch.uint8), second[name].contiguous().view(torch.uint8)), name
    assert json.loads((out / "config.json").read_text()) == json.loads((again / "config.json").read_text())
    assert (again / "mixcli.toml").read_text() == recipe  # the recipe of a rebuild is the same recipe

    # the recipe's output path (".") is the folder holding it, which a merge never replaces
    monkeypatch.chdir(out)
    result = run("merge", "mixcli.toml", "--force", code=1)
    assert f"{out} holds the project file mixcli.toml; mixcli never replaces it" in result.output


def test_dry_run_lists_every_resolved_parameter_per_model_and_warns_on_an_existing_output(tmp_path, llama_family):
    project = relative_project(tmp_path, llama_family)
    result = run("merge", project, "--dry-run")
    text = result.output
    for line in ("model a", "weight = 0.7", "density = 0.5", "weight = 0.3",
                 "density = 0.2..0.9 (varies by tensor)", "lambda = 0.9..1.1 (varies by tensor)",
                 "normalize = false", "rescale = true", "int8_mask = false",
                 "seed = 7", "written dtype = bfloat16"):  # DARE's seed and the output dtype decide the bytes too
        assert line in text, line
    assert "already exists" not in text
    (project.parent / "out").mkdir()
    result = run("merge", project, "--dry-run")
    warning = (f"warning: {project.parent / 'out'} already exists: `mixcli merge` refuses to write there "
               "without --force, and with --force replaces it")
    assert warning in result.stderr
    assert not list((project.parent / "out").iterdir())


def test_the_recipe_of_a_merge_reading_prompts_files_rebuilds_it_from_elsewhere(tmp_path, llama_family, monkeypatch):
    # a file-valued parameter (moe_merge's prompts_file) is relative to the project, so the recipe
    # in the output must name it absolutely, as it does the models
    folder = tmp_path / "proj"
    (folder / "prompts").mkdir(parents=True)
    (folder / "prompts/a.txt").write_text("12+34=\n1+1=\n")
    (folder / "prompts/b.txt").write_text("abc\nxyz\n")
    rel = {name: os.path.relpath(path, folder) for name, path in llama_family.items()}
    project = folder / "project.toml"
    project.write_text(f"""[models]
base = "{rel['base']}"
a = {{ path = "{rel['ft1']}", prompts_file = "prompts/a.txt" }}
b = {{ path = "{rel['ft2']}", negative_prompts_file = "prompts/a.txt", prompts_file = "prompts/b.txt" }}
[method]
name = "moe_merge"
base = "base"
gate_mode = "hidden"
[output]
path = "out"
""")
    run("merge", project, "--no-progress")
    out = folder / "out"
    models = tomli.loads((out / "mixcli.toml").read_text())["models"]
    assert models["a"]["prompts_file"] == str(folder / "prompts/a.txt")
    assert models["b"]["negative_prompts_file"] == str(folder / "prompts/a.txt")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    run("merge", out / "mixcli.toml", "--out", "again", "--no-progress")
    first, second = tiny_models.load_tensors(out), tiny_models.load_tensors(elsewhere / "again")
    assert sorted(first) == sorted(second)
    for name, tensor in first.items():
        assert torch.equal(tensor, second[name]), name
