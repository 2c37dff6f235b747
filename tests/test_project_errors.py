"""Bad input: one clear line naming the file, key or tensor, exit 1, no traceback, nothing written."""

import errno
import os
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from click.testing import CliRunner

import tiny_models
from conftest import write_project
from mixcli.cli import cli


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result


def assert_one_line_error(result, *fragments):
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def assert_nothing_written(folder: Path, name: str = "out"):
    assert not (folder / name).exists()
    leftovers = [p.name for p in folder.iterdir() if p.name.startswith(f".{name}.")]
    assert leftovers == []


def ties_project(tmp_path, family, extra_method="", models=None, output="out"):
    models = models or f'base = "{family["base"]}"\na = "{family["ft1"]}"\nb = "{family["ft2"]}"'
    return write_project(tmp_path, f"""
[models]
{models}

[method]
name = "ties"
base = "base"
weight = 1.0
density = 0.5
{extra_method}

[output]
path = "{output}"
""")


def test_toml_syntax_error_gives_line_and_column(tmp_path):
    project = write_project(tmp_path, "[models]\nbase = \"x\"\n[method\nname = 'ties'\n")
    assert_one_line_error(run("merge", project), "project.toml:3:", "invalid TOML")


@pytest.mark.parametrize("text, fragments", [
    ("[modles]\nbase='x'\n", ["unknown key 'modles'", "did you mean 'models'"]),
    ("[models]\nbase='x'\n[method]\nname='ties'\n[output]\npath='o'\ncompression=1\n",
     ["[output]: unknown key 'compression'"]),
    ("[models]\nbase={weight=1}\n[method]\nname='ties'\n", ["[models.base]: 'path' is missing"]),
    ("[models]\n[method]\nname='ties'\n", ["[models] is empty"]),
    ("[models]\na='x'\n", ["[method] is missing"]),
    ("[models]\na='x'\n[method]\nname='linear'\nbase='nope'\n", ["no model named 'nope'"]),
    ("[models]\na='x'\n[method]\nname='linear'\ndtype='fp8'\n", ["[method] dtype must be one of"]),
    ("[models]\na='x'\n[method]\nname='linear'\nseed=-1\n", ["seed must be a non-negative integer"]),
    ("[models]\na='x'\n[method]\nname='linear'\n[output]\nshard_size='big'\n", ["cannot read size 'big'"]),
    ("[models]\na='x'\n[method]\nname='linear'\n[evaluation]\nevaluator='perplexity'\n",
     ["project.toml: evaluation must be a list of [[evaluation]] tables, got a table; write each entry under "
      "its own [[evaluation]] header"]),
    ("evaluation = 'perplexity'\n[models]\na='x'\n[method]\nname='linear'\n",
     ["project.toml: evaluation must be a list of [[evaluation]] tables, got 'perplexity'"]),
    ("[models]\na='x'\n[method]\nname='linear'\noverrides = 3\n",
     ["project.toml: [method] overrides must be a list of [[method.overrides]] tables, got 3"]),
    ("[models]\na='x'\n[method]\nname='linear'\n[method.overrides]\nmatch='mlp'\n",
     ["project.toml: [method] overrides must be a list of [[method.overrides]] tables, got a table"]),
    ("[models]\na=3\n[method]\nname='linear'\n",
     ['project.toml: [models.a] must be a path ("models/x") or a table ({ path = "models/x", ... }), got 3']),
    ("[models]\na={path='x', loader=1}\n[method]\nname='linear'\n",
     ["project.toml: [models.a] loader must be a non-empty string"]),
    ("[models]\na={path='x', revision=['main']}\n[method]\nname='linear'\n",
     ["project.toml: [models.a] revision must be a non-empty string"]),
])
def test_structural_mistakes(tmp_path, text, fragments):
    assert_one_line_error(run("merge", write_project(tmp_path, text)), "project.toml", *fragments)


def test_unknown_method_suggests_the_closest(tmp_path, llama_family):
    project = write_project(tmp_path, f"[models]\na = '{llama_family['ft1']}'\n[method]\nname = 'tie'\n")
    assert_one_line_error(run("merge", project), "unknown method 'tie'", "did you mean 'ties'")


@pytest.mark.parametrize("extra, fragments", [
    ("densty = 0.3", ["[method]: unknown parameter 'densty' for method 'ties'", "did you mean 'density'"]),
    ("lambda = 'big'", ["parameter 'lambda' must be a number, got 'big'"]),
    ("normalize = 1", ["parameter 'normalize' must be true or false"]),
    ("[[method.overrides]]\nmatch = 'mlp'\ndensity = 1.5", ["overrides]] #1", "'density' must be <= 1.0"]),
    ("[[method.overrides]]\ndensity = 0.5", ["'match' is missing"]),
    ("[[method.overrides]]\nmatch = 'mlp'\ndensity = []",
     ["overrides]] #1: parameter 'density' is an empty list; give a value or a gradient"]),
])
def test_parameter_mistakes_are_caught_before_reading(tmp_path, llama_family, extra, fragments):
    assert_one_line_error(run("merge", ties_project(tmp_path, llama_family, extra)), *fragments)
    assert_nothing_written(tmp_path)


def test_della_density_and_epsilon_that_cannot_work_are_a_planning_error(tmp_path, llama_family):
    project = ties_project(tmp_path, llama_family, "epsilon = 0.6").read_text().replace("'ties'", "'della'")
    project = write_project(tmp_path, project.replace('name = "ties"', 'name = "della"'))
    assert_one_line_error(run("merge", project), "della: density 0.5 and epsilon 0.6 must satisfy "
                          "0 < density - epsilon and density + epsilon < 1; lower epsilon or change density")
    assert_nothing_written(tmp_path)


def test_shared_parameter_under_a_model_is_rejected(tmp_path, llama_family):
    models = (f'base = "{llama_family["base"]}"\na = {{ path = "{llama_family["ft1"]}", lambda = 0.5 }}\n'
              f'b = "{llama_family["ft2"]}"')
    result = run("merge", ties_project(tmp_path, llama_family, models=models))
    assert_one_line_error(result, "[models.a]", "parameter 'lambda' of 'ties' is shared by all models")


def test_missing_model_path(tmp_path, llama_family):
    models = f'base = "{llama_family["base"]}"\na = "models/nowhere"\nb = "{llama_family["ft2"]}"'
    result = run("merge", ties_project(tmp_path, llama_family, models=models))
    assert_one_line_error(result, "[models.a]", "'models/nowhere' is neither a local folder", "nowhere")
    models = f'base = "{llama_family["base"]}"\na = "./nowhere"\nb = "{llama_family["ft2"]}"'
    result = run("merge", ties_project(tmp_path, llama_family, models=models))
    assert_one_line_error(result, "[models.a]", "path './nowhere' does not exist")
    assert_nothing_written(tmp_path)


def copy_model(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def test_corrupt_safetensors(tmp_path, llama_family):
    broken = copy_model(llama_family["ft1"], tmp_path / "broken")
    (broken / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    models = f'base = "{llama_family["base"]}"\na = "broken"\nb = "{llama_family["ft2"]}"'
    line = assert_one_line_error(run("merge", ties_project(tmp_path, llama_family, models=models)),
                                 "model.safetensors: not a valid safetensors file", "header is not JSON")
    assert "re-download or re-save" in line
    assert_nothing_written(tmp_path)


def test_truncated_safetensors(tmp_path, llama_family):
    broken = copy_model(llama_family["ft1"], tmp_path / "short")
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) - 1000])
    models = f'base = "{llama_family["base"]}"\na = "short"\nb = "{llama_family["ft2"]}"'
    assert_one_line_error(run("merge", ties_project(tmp_path, llama_family, models=models)),
                          "short/model.safetensors: not a valid safetensors file", "data section has")
    assert_nothing_written(tmp_path)


def test_shapes_that_disagree_name_the_first_tensor(tmp_path, llama_family):
    config = tiny_models.config()
    config.intermediate_size = 96
    tiny_models.save(transformers.LlamaForCausalLM(config), tmp_path / "narrow")
    models = f'base = "{llama_family["base"]}"\na = "{llama_family["ft1"]}"\nb = "narrow"'
    assert_one_line_error(run("merge", ties_project(tmp_path, llama_family, models=models)),
                          "tensor 'model.layers.0.mlp.down_proj.weight'", "has shape [64, 160]",
                          "'b' has [64, 96]")
    assert_nothing_written(tmp_path)


def test_tensor_names_that_disagree_name_the_tensor(tmp_path, llama_family):
    tiny_models.save(transformers.LlamaForCausalLM(tiny_models.config(layers=4, tie=False)), tmp_path / "odd")
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "odd" / "model.safetensors")
    tensors["model.layers.2.extra_gate.weight"] = torch.zeros(4)
    save_file(tensors, tmp_path / "odd" / "model.safetensors", metadata={"format": "pt"})
    models = f'base = "{llama_family["base"]}"\na = "{llama_family["ft1"]}"\nb = "odd"'
    assert_one_line_error(run("merge", ties_project(tmp_path, llama_family, models=models)),
                          "layer 2", "'b'", "model.layers.2.extra_gate.weight")


def test_existing_output_needs_force(tmp_path, llama_family):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    project = ties_project(tmp_path, llama_family)
    assert_one_line_error(run("merge", project), "out already exists", "--force")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    assert run("merge", project, "--force").exit_code == 0
    assert not (tmp_path / "out" / "keep.txt").exists()
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".out.")] == []


def test_no_space_left_is_caught_before_writing(tmp_path, llama_family, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1000))
    assert_one_line_error(run("merge", ties_project(tmp_path, llama_family)),
                          "no space left on the device", "GB are free")
    assert_nothing_written(tmp_path)


def test_running_out_of_space_when_allocating_leaves_nothing(tmp_path, llama_family, monkeypatch):
    def full_disk(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full_disk)
    assert_one_line_error(run("merge", ties_project(tmp_path, llama_family)),
                          "no space left on the device while writing", "nothing was written")
    assert_nothing_written(tmp_path)


def test_running_out_of_space_while_writing_leaves_nothing(tmp_path, llama_family, monkeypatch):
    # a file system that cannot allocate ahead: tensors go out with pwrite, which fails midway
    def unsupported(fd, offset, length):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(os, "posix_fallocate", unsupported)
    real = os.pwrite
    calls = []

    def full_disk(fd, data, offset):
        calls.append(offset)
        if len(calls) > 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", full_disk)
    assert_one_line_error(run("merge", ties_project(tmp_path, llama_family)),
                          "no space left on the device while writing", "nothing was written")
    assert_nothing_written(tmp_path)


def test_linear_with_weights_summing_to_zero_is_a_planning_error(tmp_path, llama_family):
    project = write_project(tmp_path, f"""
[models]
a = {{ path = "{llama_family['ft1']}", weight = 1.0 }}
b = {{ path = "{llama_family['ft2']}", weight = -1.0 }}
[method]
name = "linear"
[output]
path = "out"
""")
    assert_one_line_error(run("merge", project), "tensor '", "weights sum to zero")
    assert_nothing_written(tmp_path)


def test_wrong_number_of_models_for_the_method(tmp_path, llama_family):
    project = write_project(tmp_path, f"""
[models]
base = "{llama_family['base']}"
a = "{llama_family['ft1']}"
b = "{llama_family['ft2']}"
[method]
name = "slerp"
base = "base"
t = 0.5
[output]
path = "out"
""")
    assert_one_line_error(run("merge", project), "method 'slerp' takes exactly 1 model(s) besides the base, got 2")


def test_base_aware_method_without_a_base(tmp_path, llama_family):
    project = write_project(tmp_path, f"""
[models]
a = "{llama_family['ft1']}"
[method]
name = "task_arithmetic"
weight = 1.0
[output]
path = "out"
""")
    assert_one_line_error(run("merge", project), "method 'task_arithmetic' needs a base model")


def test_validate_reports_ok_and_errors(tmp_path, llama_family):
    result = run("validate", ties_project(tmp_path, llama_family))
    assert result.exit_code == 0 and "ok" in result.output
    assert_nothing_written(tmp_path)
    assert_one_line_error(run("validate", tmp_path / "missing.toml"), "missing.toml: no such project file")


def test_a_required_parameter_of_a_whole_model_method_names_no_tensor(tmp_path, llama_family):
    # whole-model methods resolve their parameters once, for no tensor: the message says none
    project = write_project(tmp_path, f'[models]\na = "{llama_family["ft1"]}"\nb = "{llama_family["ft2"]}"\n'
                                      '[method]\nname = "frankenmerge"\n[output]\npath = "out"\n')
    line = assert_one_line_error(run("validate", project))
    assert line == "Error: project.toml: [method]: parameter 'layers' has no value; set it under [method] or on the model"
    assert_nothing_written(tmp_path)


def test_an_empty_output_path_is_an_error_validate_reports_too(tmp_path, llama_family):
    # validate said ok, while merge said there was no output path
    project = write_project(tmp_path, f'[models]\na = "{llama_family["ft1"]}"\nb = "{llama_family["ft2"]}"\n'
                                      '[method]\nname = "linear"\nweight = 1.0\n[output]\npath = ""\n')
    for command in ("validate", "merge"):
        assert_one_line_error(run(command, project), "project.toml: [output] path must be a non-empty string")

