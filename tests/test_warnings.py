"""Odd but legal input: one warning line naming it, and an error with --strict (nothing written)."""

import shutil

import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from conftest import write_project
from mixcli.cli import cli

NAN_TENSOR = "model.layers.1.mlp.up_proj.weight"


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def ties_project(tmp_path, family, extra="", models=None):
    models = models or f'base = "{family["base"]}"\na = "{family["ft1"]}"\nb = "{family["ft2"]}"'
    return write_project(tmp_path, f"""
[models]
{models}

[method]
name = "ties"
base = "base"
weight = 1.0
density = 0.5
{extra}

[output]
path = "out"
""")


def warning_lines(output):
    return [line for line in output.splitlines() if line.startswith("warning:")]


UNMATCHED = """
[[method.overrides]]
match = "self_attn"
density = 0.3
[[method.overrides]]
match = "self_atn"
density = 0.2
"""


def test_override_that_matches_no_tensor_is_a_warning(tmp_path, llama_family):
    project = ties_project(tmp_path, llama_family, UNMATCHED)
    result = run("merge", project)
    assert result.exit_code == 0, result.output
    assert warning_lines(result.output) == [
        "warning: project.toml: [[method.overrides]] #2 match = 'self_atn' matches no tensor"]
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_strict_makes_the_unmatched_override_an_error_and_writes_nothing(tmp_path, llama_family):
    project = ties_project(tmp_path, llama_family, UNMATCHED)
    for command in ("merge", "validate"):
        result = run(command, project, "--strict")
        assert result.exit_code == 1, result.output
        assert result.output.strip() == ("Error: project.toml: [[method.overrides]] #2 match = 'self_atn' "
                                         "matches no tensor (an error with --strict)")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["project.toml"]


def test_filters_that_match_no_tensor_are_named_at_every_level(tmp_path, llama_family):
    models = (f'base = "{llama_family["base"]}"\n'
              f'a = {{ path = "{llama_family["ft1"]}", density = [{{filter = "mlp", value = 0.4}}, '
              f'{{filter = "mpl", value = 0.6}}, {{value = 0.5}}] }}\n'
              f'b = "{llama_family["ft2"]}"')
    project = ties_project(tmp_path, llama_family, 'lambda = [{filter = "q_porj", value = 0.5}, {value = 1.0}]',
                           models=models)
    result = run("validate", project)
    assert result.exit_code == 0, result.output
    assert warning_lines(result.output) == [
        "warning: project.toml: [method]: parameter 'lambda' filter 'q_porj' matches no tensor",
        "warning: project.toml: [models.a]: parameter 'density' filter 'mpl' matches no tensor",
    ]
    assert "ties, 3 models, 39 output tensors" in result.output


def test_filters_that_match_give_no_warning(tmp_path, llama_family):
    project = ties_project(tmp_path, llama_family, '[[method.overrides]]\nmatch = "mlp"\ndensity = 0.3\n'
                                                   '[[method.overrides]]\nmatch = "*"\nlambda = 0.9')
    result = run("validate", project, "--strict")
    assert result.exit_code == 0, result.output
    assert "warning" not in result.output


def nan_model(tmp_path, family, value):
    folder = tmp_path / "odd"
    shutil.copytree(family["ft1"], folder)
    tensors = load_file(folder / "model.safetensors")
    tensors[NAN_TENSOR] = tensors[NAN_TENSOR].clone()
    tensors[NAN_TENSOR][3, 5] = value
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_nan_in_an_input_is_a_warning_naming_model_and_tensor(tmp_path, llama_family):
    odd = nan_model(tmp_path, llama_family, float("nan"))
    models = f'base = "{llama_family["base"]}"\na = "{odd}"\nb = "{llama_family["ft2"]}"'
    result = run("merge", ties_project(tmp_path, llama_family, models=models), "--no-progress")
    assert result.exit_code == 0, result.output
    assert warning_lines(result.output) == [
        f"warning: model 'a' ({odd}): tensor '{NAN_TENSOR}' holds NaN or Inf values"]
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_inf_in_an_input_with_strict_is_an_error_and_nothing_is_written(tmp_path, llama_family):
    odd = nan_model(tmp_path, llama_family, float("-inf"))
    models = f'base = "{llama_family["base"]}"\na = "{odd}"\nb = "{llama_family["ft2"]}"'
    project = ties_project(tmp_path, llama_family, models=models)
    result = run("merge", project, "--strict", "--no-progress")
    assert result.exit_code == 1, result.output
    assert result.output.strip() == (f"Error: model 'a' ({odd}): tensor '{NAN_TENSOR}' holds NaN or Inf "
                                     "values (an error with --strict)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["odd", "project.toml"]
    # validate reads no weights, so it cannot see them: the clean inputs pass merge --strict
    clean = ties_project(tmp_path, llama_family)
    assert run("merge", clean, "--strict", "--no-progress").exit_code == 0
    merged = load_file(tmp_path / "out" / "model.safetensors")
    assert all(bool(torch.isfinite(t).all()) for t in merged.values())


def test_strict_turns_plugins_warnings_into_errors_only_inside_the_block(capsys):
    import pytest

    from mixcli.errors import MixcliError, Warnings, strict_warnings, warn

    collected = Warnings()
    collected.add("project.toml: odd  thing")
    collected.add("project.toml: odd thing")
    assert collected == ["project.toml: odd thing"]
    with strict_warnings():
        with pytest.raises(MixcliError, match=r"^project.toml: odd \(an error with --strict\)$"):
            warn("project.toml: odd")
        with pytest.raises(MixcliError, match="an error with --strict"):
            collected.add("another")
    warn("project.toml: odd")
    assert capsys.readouterr().err == "warning: project.toml: odd\n"


def test_a_base_without_tokenizer_files_is_a_warning_that_the_output_has_none(tmp_path, llama_family):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(llama_family["base"] / name, bare / name)
    models = f'base = "{bare}"\na = "{llama_family["ft1"]}"\nb = "{llama_family["ft2"]}"'
    result = run("merge", ties_project(tmp_path, llama_family, models=models), "--no-progress")
    assert result.exit_code == 0, result.output
    assert (f"warning: model 'base' ({bare}) has no tokenizer files, so the output has none; copy a tokenizer "
            "into it, or make a model with one the first or the base") in result.output
    assert not (tmp_path / "out" / "tokenizer.json").exists()
    quiet = run("merge", ties_project(tmp_path, llama_family), "--no-progress", "--force")
    assert quiet.exit_code == 0 and "no tokenizer files" not in quiet.output


UPSCALERS = {
    "moe_upcycle": 'm = "{odd}"\n[method]\nname = "moe_upcycle"\nnum_experts = 2\n',
    "depth_upscaling": 'm = "{odd}"\n[method]\nname = "depth_upscaling"\nlayers = ["0:4"]\n',
    "frankenmerge": 'm = "{odd}"\n[method]\nname = "frankenmerge"\nlayers = [{{ model = "m", range = [0, 4] }}]\n',
}


def test_nan_in_an_upscalers_input_is_a_warning_and_strict_writes_nothing(tmp_path, llama_family):
    # only tensor-wise merges looked: the upscalers copied NaN into the output silently, --strict or not
    odd = nan_model(tmp_path, llama_family, float("nan"))
    for method, text in UPSCALERS.items():
        project = write_project(tmp_path, "[models]\n" + text.format(odd=odd) + '[output]\npath = "out"\n')
        result = run("merge", project, "--no-progress", "--force")
        assert result.exit_code == 0, (method, result.output)
        assert len(warning_lines(result.output)) == 1, (method, result.output)
        line = warning_lines(result.output)[0]
        assert line.startswith(f"warning: model 'm' ({odd}): tensor '{NAN_TENSOR}' holds NaN or Inf"), (method, line)
        shutil.rmtree(tmp_path / "out")
        result = run("merge", project, "--no-progress", "--strict")
        assert result.exit_code == 1, (method, result.output)
        assert result.output.strip().endswith("(an error with --strict)"), (method, result.output)
        assert not (tmp_path / "out").exists(), method
