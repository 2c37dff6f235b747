"""`mixcli import-mergekit`: the recipes of mergekit's documentation examples (linear, gradient
SLERP with filters, TIES with gradients and filters, DARE-TIES, passthrough slices, task
arithmetic), written out here with the tiny Llama family in place of their models, translate
into mixcli projects that merge to exactly the tensors of the same recipes written by hand."""

import json

import pytest
import tomli
import torch
from click.testing import CliRunner

import tiny_models
from mixcli.cli import cli


def run(*args, code=0):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == code, result.output + repr(result.exception)
    return result


# mergekit's examples (examples/linear.yml, gradient-slerp.yml, ties.yml, orcamini-platy-44layer.yml,
# the README's dare_ties, task arithmetic, sce and nuslerp), with 4-layer models: layer ranges and
# gradients shortened
EXAMPLES = {
    "linear": ("""
models:
  - model: {ft1}
    parameters:
      weight: 1.0
  - model: {ft2}
    parameters:
      weight: 0.3
  - model: {ft3}
    parameters:
      weight: 0.5
merge_method: linear
dtype: float16
""", """
[models]
ft1 = {{ path = "{ft1}", weight = 1.0 }}
ft2 = {{ path = "{ft2}", weight = 0.3 }}
ft3 = {{ path = "{ft3}", weight = 0.5 }}
[method]
name = "linear"
dtype = "float16"
"""),
    "gradient-slerp": ("""
slices:
  - sources:
      - model: {base}
        layer_range: [0, 4]
      - model: {ft1}
        layer_range: [0, 4]
merge_method: slerp
base_model: {base}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5 # fallback for rest of tensors
dtype: float16
""", """
[models]
base = "{base}"
ft1 = "{ft1}"
[method]
name = "slerp"
base = "base"
dtype = "float16"
t = [{{ filter = "self_attn", value = [0, 0.5, 0.3, 0.7, 1] }},
     {{ filter = "mlp", value = [1, 0.5, 0.7, 0.3, 0] }}, {{ value = 0.5 }}]
[[slices]]
sources = [{{ model = "base", layer_range = [0, 4] }}, {{ model = "ft1", layer_range = [0, 4] }}]
"""),
    "ties": ("""
models:
  - model: {ft1}
    parameters:
      density: [1, 0.7, 0.1] # density gradient
      weight: 1.0
  - model: {ft2}
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1] # weight gradient
  - model: {ft3}
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: {base}
parameters:
  normalize: true
  int8_mask: true
dtype: float16
""", """
[models]
base = "{base}"
ft1 = {{ path = "{ft1}", density = [1, 0.7, 0.1], weight = 1.0 }}
ft2 = {{ path = "{ft2}", density = 0.5, weight = [0, 0.3, 0.7, 1] }}
ft3 = {{ path = "{ft3}", density = 0.33, weight = [{{ filter = "mlp", value = 0.5 }}, {{ value = 0 }}] }}
[method]
name = "ties"
base = "base"
normalize = true
int8_mask = true
dtype = "float16"
"""),
    "dare_ties": ("""
models:
  - model: {base}
    # no parameters necessary for base model
  - model: {ft1}
    parameters:
      density: 0.53
      weight: 0.4
  - model: {ft2}
    parameters:
      density: 0.53
      weight: 0.3
  - model: {ft3}
    parameters:
      density: 0.53
      weight: 0.3
merge_method: dare_ties
base_model: {base}
parameters:
  int8_mask: true
dtype: bfloat16
""", """
[models]
base = "{base}"
ft1 = {{ path = "{ft1}", density = 0.53, weight = 0.4 }}
ft2 = {{ path = "{ft2}", density = 0.53, weight = 0.3 }}
ft3 = {{ path = "{ft3}", density = 0.53, weight = 0.3 }}
[method]
name = "dare_ties"
base = "base"
int8_mask = true
dtype = "bfloat16"
"""),
    "passthrough": ("""
slices:
  - sources:
    - model: {ft1}
      layer_range: [0, 3]
  - sources:
    - model: {ft2}
      layer_range: [1, 4]
merge_method: passthrough
dtype: float16
""", """
[models]
ft1 = "{ft1}"
ft2 = "{ft2}"
[method]
name = "passthrough"
dtype = "float16"
[[slices]]
sources = [{{ model = "ft1", layer_range = [0, 3] }}]
[[slices]]
sources = [{{ model = "ft2", layer_range = [1, 4] }}]
"""),
    "task_arithmetic": ("""
base_model: {base}
models:
  - model: {ft1}
    parameters:
      weight: 0.7
  - model: {ft2}
    parameters:
      weight: [0.2, 0.6]
parameters:
  lambda: 0.8
  normalize: false
merge_method: task_arithmetic
dtype: float32
out_dtype: bfloat16
tokenizer_source: base
""", """
[models]
base = "{base}"
ft1 = {{ path = "{ft1}", weight = 0.7 }}
ft2 = {{ path = "{ft2}", weight = [0.2, 0.6] }}
[method]
name = "task_arithmetic"
base = "base"
lambda = 0.8
normalize = false
dtype = "float32"
[output]
dtype = "bfloat16"
"""),
    # methods the registry gained later translate the same way (looked up, not listed)
    "sce": ("""
models:
  - model: {ft1}
  - model: {ft2}
  - model: {ft3}
merge_method: sce
base_model: {base}
parameters:
  select_topk: 0.6
dtype: bfloat16
""", """
[models]
ft1 = "{ft1}"
ft2 = "{ft2}"
ft3 = "{ft3}"
base = "{base}"
[method]
name = "sce"
base = "base"
select_topk = 0.6
dtype = "bfloat16"
"""),
    "nuslerp": ("""
models:
  - model: {ft1}
    parameters:
      weight: 0.7
  - model: {ft2}
    parameters:
      weight: 0.3
merge_method: nuslerp
parameters:
  nuslerp_row_wise: true
""", """
[models]
ft1 = {{ path = "{ft1}", weight = 0.7 }}
ft2 = {{ path = "{ft2}", weight = 0.3 }}
[method]
name = "nuslerp"
nuslerp_row_wise = true
"""),
}


def _bytes(tensor):
    return tensor.contiguous().view(torch.uint8)


@pytest.mark.parametrize("example", sorted(EXAMPLES))
def test_translated_example_merges_to_the_tensors_of_the_hand_written_project(example, tmp_path, llama_family,
                                                                             monkeypatch):
    yaml_text, toml_text = EXAMPLES[example]
    paths = {name: str(path) for name, path in llama_family.items()}
    config = tmp_path / f"{example}.yml"
    config.write_text(yaml_text.format(**paths))
    monkeypatch.chdir(tmp_path)
    result = run("import-mergekit", config, "--out", "translated.toml")
    assert f"wrote translated.toml from {config}" in result.output
    translated = tomli.loads((tmp_path / "translated.toml").read_text())
    assert translated["output"]["path"] == f"out/{example}"
    run("merge", "translated.toml", "--no-progress")

    hand = tmp_path / "hand.toml"
    hand.write_text(toml_text.format(**paths) + ("" if "[output]" in toml_text else "[output]\n")
                    + 'path = "by-hand"\n')
    run("merge", hand, "--no-progress")
    ours, theirs = tmp_path / "out" / example, tmp_path / "by-hand"
    got, want = tiny_models.load_tensors(ours), tiny_models.load_tensors(theirs)
    assert sorted(got) == sorted(want) and got
    for name in want:
        assert got[name].dtype == want[name].dtype and torch.equal(_bytes(got[name]), _bytes(want[name])), name
    assert json.loads((ours / "config.json").read_text()) == json.loads((theirs / "config.json").read_text())


def test_translation_shape(tmp_path, llama_family, monkeypatch):
    """What the translated project says, key by key, for the TIES example."""
    paths = {name: str(path) for name, path in llama_family.items()}
    config = tmp_path / "ties.yml"
    config.write_text(EXAMPLES["ties"][0].format(**paths))
    monkeypatch.chdir(tmp_path)
    run("import-mergekit", config, "--output-path", "merged/ties")
    data = tomli.loads((tmp_path / "project.toml").read_text())
    assert data == {
        "models": {"base": {"path": paths["base"]},
                   "ft1": {"path": paths["ft1"], "density": [1, 0.7, 0.1], "weight": 1.0},
                   "ft2": {"path": paths["ft2"], "density": 0.5, "weight": [0, 0.3, 0.7, 1]},
                   "ft3": {"path": paths["ft3"], "density": 0.33,
                           "weight": [{"filter": "mlp", "value": 0.5}, {"value": 0}]}},
        "method": {"name": "ties", "base": "base", "dtype": "float16", "normalize": True, "int8_mask": True},
        "output": {"path": "merged/ties"}}
    # a Hub id stays a Hub id, with its revision; relative local folders are found from the working directory
    config.write_text("models:\n  - model: org/some-model@v2\n    parameters: {weight: 1.0}\n"
                      "  - model: ./rel\n    parameters: {weight: 1.0}\n"
                      "  - model: {model: {path: org/other, revision: main}}\n    parameters: {weight: 1.0}\n"
                      "merge_method: linear\n")
    (tmp_path / "rel").mkdir()
    run("import-mergekit", config, "--force")
    data = tomli.loads((tmp_path / "project.toml").read_text())
    assert data["models"] == {"some-model": {"path": "org/some-model", "revision": "v2", "weight": 1.0},
                              "rel": {"path": str(tmp_path / "rel"), "weight": 1.0},
                              "other": {"path": "org/other", "revision": "main", "weight": 1.0}}


def test_tokenizer_source_becomes_the_tokenizer_table(tmp_path, llama_family, monkeypatch):
    monkeypatch.chdir(tmp_path)
    paths = {name: str(path) for name, path in llama_family.items()}
    for written, source in (("tokenizer_source: union", "union"), (f"tokenizer_source: {paths['ft1']}", "model:ft1"),
                            ("tokenizer:\n  source: base\n  pad_to_multiple_of: 64", "base")):
        (tmp_path / "r.yml").write_text(f"merge_method: ties\nbase_model: {paths['base']}\nmodels:\n"
                                        f"  - model: {paths['ft1']}\n    parameters: {{weight: 1.0}}\n{written}\n")
        run("import-mergekit", "r.yml", "--force")
        table = tomli.loads((tmp_path / "project.toml").read_text())["tokenizer"]
        assert table == {"source": source, **({"pad_to_multiple_of": 64} if "pad" in written else {})}


@pytest.mark.parametrize("recipe, message", [
    ("merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1}\nchat_template: chatml\n",
     "chat_template: no mixcli equivalent; remove it or translate it by hand"),
    ("merge_method: dare_tiez\nmodels:\n  - model: a\n",
     "merge_method: 'dare_tiez' has no mixcli equivalent installed (did you mean 'dare_ties'?); "
     "`mixcli list-methods` shows the methods"),
    ("merge_method: moe_merge\nmodels:\n  - model: a\n",
     "merge_method: 'moe_merge' has no mixcli equivalent installed..."),  # an upscaler, not a merge method
    ("merge_method: passthrough\nslices:\n  - sources:\n      - model: a\n        layer_range: [0, 2]\n"
     "    residual_weight: 0.5\n",
     "slices[0].residual_weight: no mixcli equivalent; remove it or translate it by hand"),
    ("merge_method: linear\nmodels:\n  - model: {model: {path: a}, lora: {path: l, revision: x}}\n",
     "models[0].model.lora must be {path: ...} (an adapter revision cannot be translated: download the "
     "adapter and give its folder)"),
    ("merge_method: linear\nmodels:\n  - model: a+loras/a+loras/b\n    parameters: {weight: 1}\n",
     "models[0].model: 'a+loras/a+loras/b' must be 'model+lora' with one '+'"),
    ("merge_method: ties\nbase_model: b\nmodels:\n  - model: a\n    parameters: {weight: 1, densty: 0.5}\n",
     "models[0].parameters.densty: method 'ties' has no parameter 'densty' (did you mean 'density'?)"),
    ("merge_method: slerp\nbase_model: b\nmodels:\n  - model: a\n    parameters: {t: 0.5}\n",
     "models[0].parameters.t: 't' is shared by all models (mergekit ignores it here); move it to the "
     "top-level or the slice's parameters"),
    ("merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1}\ndtype: int4\n",
     "dtype: unknown dtype 'int4'; mixcli writes bfloat16, float16, float32, float64"),
    ("merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1}\n"
     "tokenizer:\n  source: base\n  tokens:\n    <|im_end|>: {source: a}\n",
     "tokenizer.tokens: no mixcli equivalent; remove it or translate it by hand"),
    ("merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: [1, 2\n",
     None),
    ("merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1}\n"
     "  - model: a\n    parameters: {weight: 2}\n",
     "models[1].model: 'a' is listed twice; list each model once"),
    ("merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: .inf}\n",
     "the translated project is invalid: project.toml: [models.a]: parameter 'weight' must be finite, got inf"),
    ("merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 2020-01-01}\n",
     "models[0].parameters.weight: datetime.date(2020, 1, 1) is not a number, string or boolean"),
])
def test_what_cannot_be_translated_is_one_line_naming_the_key(tmp_path, recipe, message, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "recipe.yml"
    config.write_text(recipe)
    result = run("import-mergekit", "recipe.yml", code=1)
    line = result.output.strip()
    assert "\n" not in line and line.startswith("Error: recipe.yml")
    if message is None:
        assert line.startswith("Error: recipe.yml:5:") and "invalid YAML" in line, line
    elif message.endswith("..."):  # the closest-name hint depends on what is installed
        assert line.startswith(f"Error: recipe.yml: {message[:-3]}") and line.endswith("shows the methods")
    else:
        assert line == f"Error: recipe.yml: {message}"
    assert not (tmp_path / "project.toml").exists()


def test_yaml_numbers_written_as_strings_are_numbers(tmp_path, llama_family, monkeypatch):
    # YAML 1.1 reads 1e-3 as a string; mergekit takes it as a number, in gradients and filters too
    monkeypatch.chdir(tmp_path)
    paths = {name: str(path) for name, path in llama_family.items()}
    (tmp_path / "r.yml").write_text(
        f"merge_method: dare_ties\nbase_model: {paths['base']}\nparameters: {{lambda: 1e-0}}\nmodels:\n"
        f"  - model: {paths['ft1']}\n    parameters:\n      density: 5e-1\n"
        f"      weight: [{{filter: mlp, value: [1e-1, 2e-1]}}, {{value: 1e+0}}]\n")
    run("import-mergekit", "r.yml")
    data = tomli.loads((tmp_path / "project.toml").read_text())
    assert data["method"]["lambda"] == 1.0
    assert data["models"]["ft1"]["density"] == 0.5
    assert data["models"]["ft1"]["weight"] == [{"filter": "mlp", "value": [0.1, 0.2]}, {"value": 1.0}]


def test_a_project_that_cannot_be_written_is_one_line(tmp_path, llama_family, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.yml").write_text(f"merge_method: linear\nmodels:\n  - model: {llama_family['ft1']}\n")
    result = run("import-mergekit", "r.yml", "--out", "missing/project.toml", code=1)
    assert result.output.startswith("Error: missing/project.toml: cannot write the project (")
    assert "\n" not in result.output.strip() and "Traceback" not in result.output
