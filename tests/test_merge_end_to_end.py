"""Whole merges through the CLI on tiny seeded models: the engine's output equals the method's
pure function applied to the input tensors, loads with stock transformers and gives finite logits."""

import errno
import json
import os

import pytest
import tomli
import torch
import transformers
from click.testing import CliRunner

import tiny_models
from conftest import write_project
from mixcli.cli import cli
from mixcli.plugins import get_registry
from mixcli.seeding import derive_seed

METHODS = {
    "linear": ("", "weight = 0.5"),
    "task_arithmetic": ('base = "base"', "weight = 0.5"),
    "ties": ('base = "base"', "weight = 0.5\ndensity = 0.5"),
    "dare_ties": ('base = "base"', "weight = 0.5\ndensity = 0.5"),
    "dare_linear": ('base = "base"', "weight = 0.5\ndensity = 0.5"),
    "breadcrumbs": ('base = "base"', "weight = 0.5\ndensity = 0.8\ngamma = 0.05"),
    "breadcrumbs_ties": ('base = "base"', "weight = 0.5\ndensity = 0.8"),
    "della": ('base = "base"', "weight = 0.5\ndensity = 0.5"),
    "della_linear": ('base = "base"', "weight = 0.5\ndensity = 0.5"),
    "model_stock": ('base = "base"', ""),
}


def unsupported_allocation(fd, offset, length):
    raise OSError(errno.EOPNOTSUPP, "Operation not supported")


def merge(project, *args):
    result = CliRunner().invoke(cli, ["merge", str(project), *map(str, args)])
    assert result.exit_code == 0, result.output
    return result


def expected_tensor(method_name, name, family, models, base, params, seed=0):
    method = get_registry().methods[method_name]
    tensors = {m: tiny_models.load_tensors(family[m])[name] for m in models + ([base] if base else [])}
    kwargs = dict(params)
    if method.random:
        kwargs["seed"] = derive_seed(seed, name)
    return method.merge([tensors[m] for m in models], tensors[base] if base else None, **kwargs)


@pytest.mark.parametrize("writer", ["mapped", "pwrite"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_output_equals_its_pure_function_and_loads(method, writer, tmp_path, llama_family, monkeypatch):
    if writer == "pwrite":  # a file system that cannot allocate blocks ahead
        monkeypatch.setattr(os, "posix_fallocate", unsupported_allocation)
    base_line, params = METHODS[method]
    models = f'base = "{llama_family["base"]}"\nft1 = "{llama_family["ft1"]}"\nft2 = "{llama_family["ft2"]}"'
    if method == "linear":
        models = f'ft1 = "{llama_family["ft1"]}"\nft2 = "{llama_family["ft2"]}"\nft3 = "{llama_family["ft3"]}"'
    project = write_project(tmp_path, f"""
[models]
{models}
[method]
name = "{method}"
{base_line}
{params}
[output]
path = "out"
""")
    merge(project)
    merged = tiny_models.load_tensors(tmp_path / "out")
    spec = get_registry().methods[method].param_specs
    resolved = {}
    for line in params.splitlines():
        key, value = (part.strip() for part in line.split("="))
        resolved[spec[key].field] = float(value)
    n_models = 3 if method == "linear" else 2
    for key in list(resolved):
        if spec[key.rstrip("_")].per_model:
            resolved[key] = [resolved[key]] * n_models
    inputs = ["ft1", "ft2", "ft3"] if method == "linear" else ["ft1", "ft2"]
    base = None if method == "linear" else "base"
    for name in ("model.layers.1.mlp.up_proj.weight", "model.norm.weight", "lm_head.weight"):
        want = expected_tensor(method, name, llama_family, inputs, base, resolved)
        assert torch.equal(merged[name], want), name
    logits = tiny_models.logits(tmp_path / "out")
    assert logits.shape[-1] == 52 and torch.isfinite(logits).all()
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"`{method}`" in card and "mixcli 0.1.0" in card
    recipe = tomli.loads((tmp_path / "out" / "mixcli.toml").read_text())
    written = tomli.loads(project.read_text())
    written["output"]["path"] = "."  # the recipe's output is the folder holding it; models were absolute
    assert recipe == written
    assert (tmp_path / "out" / "tokenizer.json").is_file()


def test_linear_weights_one_zero_return_the_first_model(tmp_path, llama_family):
    project = write_project(tmp_path, f"""
[models]
a = {{ path = "{llama_family['ft1']}", weight = 1.0 }}
b = {{ path = "{llama_family['ft2']}", weight = 0.0 }}
[method]
name = "linear"
[output]
path = "out"
shard_size = "100KB"
""")
    merge(project)
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "out").glob("model-*-of-*.safetensors"))) > 3
    source, merged = tiny_models.load_tensors(llama_family["ft1"]), tiny_models.load_tensors(tmp_path / "out")
    assert source.keys() == merged.keys() and all(torch.equal(source[k], merged[k]) for k in source)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.equal(tiny_models.logits(tmp_path / "out"), tiny_models.logits(llama_family["ft1"]))
    assert model.config.num_hidden_layers == 4


def test_slerp_gradient_per_filter(tmp_path, llama_family):
    project = write_project(tmp_path, f"""
[models]
a = "{llama_family['ft1']}"
b = "{llama_family['ft2']}"
[method]
name = "slerp"
base = "a"
t = [{{ filter = "self_attn", value = [0.0, 1.0] }}, {{ value = 0.5 }}]
[output]
path = "out"
""")
    merge(project)
    a, b = tiny_models.load_tensors(llama_family["ft1"]), tiny_models.load_tensors(llama_family["ft2"])
    out = tiny_models.load_tensors(tmp_path / "out")
    q = "model.layers.{}.self_attn.q_proj.weight"
    assert torch.equal(out[q.format(0)], a[q.format(0)])  # t = 0 at the first layer
    assert torch.equal(out[q.format(3)], b[q.format(3)])  # t = 1 at the last layer
    slerp = get_registry().methods["slerp"].merge
    for layer, t in ((1, 1 / 3), (2, 2 / 3)):
        assert torch.equal(out[q.format(layer)], slerp([b[q.format(layer)]], a[q.format(layer)], t=t))
    up = "model.layers.2.mlp.up_proj.weight"
    assert torch.equal(out[up], slerp([b[up]], a[up], t=0.5))


def test_slerp_past_the_models_needs_extrapolate(tmp_path, llama_family):
    text = f"""
[models]
a = "{llama_family['ft1']}"
b = "{llama_family['ft2']}"
[method]
name = "slerp"
base = "a"
t = 1.5
[output]
path = "out"
"""
    project = write_project(tmp_path, text)
    result = CliRunner().invoke(cli, ["merge", str(project)])
    assert result.exit_code == 1 and result.output.strip() == (
        "Error: project.toml: [method]: parameter 't' must be <= 1.0, got 1.5; set extrapolate = true "
        "under [method] to allow it")
    assert not (tmp_path / "out").exists()
    merge(write_project(tmp_path, text.replace("t = 1.5", "t = 1.5\nextrapolate = true")))
    a, b = tiny_models.load_tensors(llama_family["ft1"]), tiny_models.load_tensors(llama_family["ft2"])
    out = tiny_models.load_tensors(tmp_path / "out")
    name = "model.layers.1.mlp.down_proj.weight"
    # the great-circle formula, in float64, continued past b
    x, y = a[name].double().flatten(), b[name].double().flatten()
    theta = torch.acos(torch.dot(x / x.norm(), y / y.norm()))
    expected = (torch.sin(-0.5 * theta) * x + torch.sin(1.5 * theta) * y) / torch.sin(theta)
    assert torch.allclose(out[name].double().flatten(), expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out[name], b[name], atol=1e-3)


def test_overrides_restricted_to_a_model_and_first_match_wins(tmp_path, llama_family):
    project = write_project(tmp_path, f"""
[models]
a = {{ path = "{llama_family['ft1']}", weight = 0.5 }}
b = {{ path = "{llama_family['ft2']}" }}
[method]
name = "linear"
weight = 0.5
[[method.overrides]]
match = "self_attn.q_proj"
weight = 1.0
[[method.overrides]]
match = "self_attn"
models = ["b"]
weight = 0.0
""" + '[output]\npath = "out"\n')
    merge(project)
    a, b = tiny_models.load_tensors(llama_family["ft1"]), tiny_models.load_tensors(llama_family["ft2"])
    out = tiny_models.load_tensors(tmp_path / "out")
    k = "model.layers.0.self_attn.k_proj.weight"  # a's own weight beats the override: 0.5 a + 0 b
    assert torch.allclose(out[k], a[k], atol=0, rtol=1e-6)
    q = "model.layers.0.self_attn.q_proj.weight"  # b: q_proj override (1.0) matches before self_attn
    assert torch.allclose(out[q], (0.5 * a[q] + 1.0 * b[q]) / 1.5, atol=1e-7)
    up = "model.layers.0.mlp.up_proj.weight"
    assert torch.allclose(out[up], (a[up] + b[up]) / 2, atol=1e-7)


def test_slices_filters_match_input_names_for_model_parameters_and_output_names_for_shared(tmp_path, llama_family):
    project = write_project(tmp_path, f"""
[models]
base = "{llama_family['base']}"
a = "{llama_family['ft1']}"
[method]
name = "task_arithmetic"
base = "base"
lambda = [{{ filter = "layers.0.mlp", value = 0.0 }}, {{ value = 1.0 }}]
[[slices]]
sources = [{{ model = "base", layer_range = [2, 4] }}, {{ model = "a", layer_range = [2, 4], weight = [{{ filter = "layers.2.self_attn", value = 0.0 }}, {{ value = 1.0 }}] }}]
[output]
path = "out"
""")
    merge(project)
    base, a = tiny_models.load_tensors(llama_family["base"]), tiny_models.load_tensors(llama_family["ft1"])
    out = tiny_models.load_tensors(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 2
    # shared lambda filter sees the output name (layer 0), per-model weight filter the input name (layer 2)
    assert torch.equal(out["model.layers.0.mlp.up_proj.weight"], base["model.layers.2.mlp.up_proj.weight"])
    assert torch.equal(out["model.layers.0.self_attn.q_proj.weight"], base["model.layers.2.self_attn.q_proj.weight"])
    assert torch.allclose(out["model.layers.1.mlp.up_proj.weight"], a["model.layers.3.mlp.up_proj.weight"], atol=1e-7)


def test_passthrough_frankenmerge_of_two_models(tmp_path, llama_family):
    project = write_project(tmp_path, f"""
[models]
a = "{llama_family['ft1']}"
b = "{llama_family['ft2']}"
[method]
name = "passthrough"
[[slices]]
sources = [{{ model = "a", layer_range = [0, 2] }}]
[[slices]]
sources = [{{ model = "b", layer_range = [1, 4] }}]
[output]
path = "out"
""")
    merge(project)
    a, b = tiny_models.load_tensors(llama_family["ft1"]), tiny_models.load_tensors(llama_family["ft2"])
    out = tiny_models.load_tensors(tmp_path / "out")
    sources = [("a", 0), ("a", 1), ("b", 1), ("b", 2), ("b", 3)]
    for index, (model, layer) in enumerate(sources):
        source = a if model == "a" else b
        for suffix in ("self_attn.o_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
            assert torch.equal(out[f"model.layers.{index}.{suffix}"], source[f"model.layers.{layer}.{suffix}"])
    assert torch.equal(out["model.embed_tokens.weight"], a["model.embed_tokens.weight"])
    assert torch.equal(out["lm_head.weight"], b["lm_head.weight"])
    assert torch.equal(out["model.norm.weight"], b["model.norm.weight"])
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.num_hidden_layers == 5
    assert torch.isfinite(tiny_models.logits(tmp_path / "out")).all()


def test_bf16_inputs_give_bf16_output_and_out_dtype_controls_it(tmp_path, llama_bf16_family):
    text = f"""
[models]
base = "{llama_bf16_family['base']}"
a = {{ path = "{llama_bf16_family['ft1']}", weight = 1.0 }}
b = {{ path = "{llama_bf16_family['ft2']}", weight = 1.0 }}
[method]
name = "ties"
base = "base"
density = 0.5
"""
    merge(write_project(tmp_path, text + '[output]\npath = "bf"\n', "bf.toml"))
    merge(write_project(tmp_path, text + '[output]\npath = "fp"\ndtype = "float32"\n', "fp.toml"))
    bf, fp = tiny_models.load_tensors(tmp_path / "bf"), tiny_models.load_tensors(tmp_path / "fp")
    assert {t.dtype for t in bf.values()} == {torch.bfloat16}
    assert {t.dtype for t in fp.values()} == {torch.float32}
    assert json.loads((tmp_path / "bf" / "config.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((tmp_path / "fp" / "config.json").read_text())["dtype"] == "float32"
    assert all(torch.equal(fp[k], bf[k].float()) for k in bf)  # computed in bf16, written wider


def test_mistral_family_merges_and_loads(tmp_path, mistral_family):
    project = write_project(tmp_path, f"""
[models]
base = "{mistral_family['base']}"
a = "{mistral_family['ft1']}"
b = "{mistral_family['ft2']}"
[method]
name = "dare_ties"
base = "base"
weight = 0.5
density = 0.6
seed = 7
[output]
path = "out"
""")
    merge(project)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert type(model).__name__ == "MistralForCausalLM"
    assert torch.isfinite(tiny_models.logits(tmp_path / "out")).all()


def test_random_methods_depend_on_the_seed_only(tmp_path, llama_family):
    def run(seed, workers, name):
        project = write_project(tmp_path, f"""
[models]
base = "{llama_family['base']}"
a = "{llama_family['ft1']}"
b = "{llama_family['ft2']}"
[method]
name = "dare_ties"
base = "base"
weight = 0.5
density = 0.5
seed = {seed}
[output]
path = "{name}"
""", f"{name}.toml")
        merge(project, "--workers", workers)
        return tiny_models.load_tensors(tmp_path / name)

    one, two, other = run(1, 1, "one"), run(1, 2, "two"), run(2, 2, "other")
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert not torch.equal(one["model.layers.0.mlp.up_proj.weight"], other["model.layers.0.mlp.up_proj.weight"])


def test_tied_models_write_no_head_and_mixed_ones_untie(tmp_path, tied_family, llama_family):
    tied = write_project(tmp_path, f"""
[models]
a = "{tied_family['ft1']}"
b = "{tied_family['ft2']}"
[method]
name = "linear"
weight = 1.0
[output]
path = "tied"
""", "tied.toml")
    merge(tied)
    out = tiny_models.load_tensors(tmp_path / "tied")
    assert "lm_head.weight" not in out
    assert json.loads((tmp_path / "tied" / "config.json").read_text())["tie_word_embeddings"] is True
    assert torch.isfinite(tiny_models.logits(tmp_path / "tied")).all()
    mixed = write_project(tmp_path, f"""
[models]
a = "{llama_family['ft1']}"
b = "{tied_family['ft1']}"
[method]
name = "linear"
weight = 1.0
[output]
path = "mixed"
""", "mixed.toml")
    merge(mixed)
    out = tiny_models.load_tensors(tmp_path / "mixed")
    a, b = tiny_models.load_tensors(llama_family["ft1"]), tiny_models.load_tensors(tied_family["ft1"])
    want = ((a["lm_head.weight"] + b["model.embed_tokens.weight"]) / 2)
    assert torch.allclose(out["lm_head.weight"], want, atol=1e-7)
    assert json.loads((tmp_path / "mixed" / "config.json").read_text())["tie_word_embeddings"] is False
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "mixed")
    assert torch.equal(model.lm_head.weight.detach(), out["lm_head.weight"])


def test_pickled_bin_checkpoints_are_read_weights_only(tmp_path, llama_family):
    import shutil

    shutil.copytree(llama_family["ft1"], tmp_path / "pickled")
    (tmp_path / "pickled" / "model.safetensors").unlink()
    torch.save(tiny_models.load_tensors(llama_family["ft1"]), tmp_path / "pickled" / "pytorch_model.bin")
    project = write_project(tmp_path, f"""
[models]
a = {{ path = "pickled", weight = 1.0 }}
b = {{ path = "{llama_family['ft1']}", weight = 1.0 }}
[method]
name = "linear"
[output]
path = "out"
""")
    merge(project)
    out, source = tiny_models.load_tensors(tmp_path / "out"), tiny_models.load_tensors(llama_family["ft1"])
    assert all(torch.allclose(out[k], source[k], atol=1e-7) for k in source)


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, llama_family):
    project = write_project(tmp_path, f"""
[models]
base = "{llama_family['base']}"
a = "{llama_family['ft1']}"
[method]
name = "ties"
base = "base"
weight = 1.0
density = 0.3
[output]
path = "out"
""")
    result = merge(project, "--dry-run")
    for fragment in ("ties", "tensors", "39", "output size", "expected peak memory", "density"):
        assert fragment in result.output
    assert not (tmp_path / "out").exists()


METHOD_LINES = {"linear": "weight = 0.5", "ties": "weight = 0.5", "slerp": "t = 0.5", "model_stock": ""}


@pytest.mark.parametrize("method, output_dtype, in_place", [
    ("linear", "", True), ("ties", "", True), ("slerp", "", True),
    ("linear", 'dtype = "float32"', False),  # computed in bf16, widened on the way out
    ("model_stock", "", False),  # model_stock returns a new tensor
])
def test_in_place_computation_is_planned_only_where_it_applies(tmp_path, llama_bf16_family, method,
                                                               output_dtype, in_place):
    from mixcli.core import prepare

    project = write_project(tmp_path, f"""
[models]
base = "{llama_bf16_family['base']}"
a = "{llama_bf16_family['ft1']}"
{"" if method == "slerp" else 'b = "' + str(llama_bf16_family['ft2']) + '"'}
[method]
name = "{method}"
base = "base"
{METHOD_LINES[method]}
[output]
path = "out"
{output_dtype}
""")
    tensors = prepare(project).plan.tensors
    assert {t.fill is not None for t in tensors} == {in_place}
    merge(project)
    want = "torch.float32" if output_dtype else "torch.bfloat16"
    assert {str(t.dtype) for t in tiny_models.load_tensors(tmp_path / "out").values()} == {want}
