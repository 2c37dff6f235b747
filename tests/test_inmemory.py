"""Candidates built in memory: bitwise the tensors `mixcli merge` writes, a resident model that
computes what the written folder computes, evaluators that measure it alike, and projects
built from a dict with the errors of a project file."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from click.testing import CliRunner
from safetensors.torch import save_file

import tiny_models
from mixcli.cli import cli
from mixcli.errors import MixcliError
from mixcli.evaluation import run_evaluator
from mixcli.inmemory import build, build_model, build_state_dict
from mixcli.plugins import get_registry
from mixcli.project import project_from_dict
from mixcli.tomlwrite import dumps

RECIPES = {
    "linear": {"method": {"name": "linear"}, "weights": {"ft1": 0.3, "ft2": 0.7}, "models": ["ft1", "ft2"]},
    "task_arithmetic": {"method": {"name": "task_arithmetic", "base": "base"}, "weights": {"ft1": 0.6, "ft2": 0.5}},
    "ties": {"method": {"name": "ties", "base": "base", "density": 0.5}, "weights": {"ft1": 0.5, "ft2": 0.8}},
    "dare_ties": {"method": {"name": "dare_ties", "base": "base", "density": 0.4, "seed": 7},
                  "weights": {"ft1": 0.5, "ft2": 0.5}},
    "slerp": {"method": {"name": "slerp", "base": "ft1", "t": [0.2, 0.7]}, "weights": {}, "models": ["ft1", "ft2"]},
}


def recipe(family, name: str, out: Path) -> dict:
    spec = RECIPES[name]
    models = spec.get("models", ["base", "ft1", "ft2"])
    entries = {}
    for model in models:
        entry = {"path": str(family[model])}
        if model in spec["weights"]:
            entry["weight"] = spec["weights"][model]
        entries[model] = entry
    return {"models": entries, "method": dict(spec["method"]), "output": {"path": str(out)}}


def passthrough_slices(family, out: Path) -> dict:
    return {"models": {"base": str(family["base"]), "ft1": str(family["ft1"])},
            "method": {"name": "passthrough"},
            "slices": [{"sources": [{"model": "base", "layer_range": [0, 3]}]},
                       {"sources": [{"model": "ft1", "layer_range": [1, 4]}]}],
            "output": {"path": str(out)}}


def frankenmerge(family, out: Path) -> dict:
    return {"models": {"base": str(family["base"]), "ft2": str(family["ft2"])},
            "method": {"name": "frankenmerge", "layers": [{"model": "base", "range": [0, 2]},
                                                          {"model": "ft2", "range": [1, 4]}]},
            "output": {"path": str(out)}}


def merge_on_disk(data: dict, folder: Path) -> dict[str, torch.Tensor]:
    folder.mkdir(parents=True, exist_ok=True)
    project = folder / "project.toml"
    project.write_text(dumps(data))
    result = CliRunner().invoke(cli, ["merge", str(project), "--no-progress"])
    assert result.exit_code == 0, result.output
    return tiny_models.load_tensors(Path(data["output"]["path"]))


def assert_bitwise(disk: dict, memory: dict) -> None:
    assert list(memory) and set(memory) == set(disk)
    for name, tensor in disk.items():
        got = memory[name]
        assert got.dtype == tensor.dtype and got.shape == tensor.shape, name
        assert torch.equal(got.reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), name


@pytest.mark.parametrize("name", sorted(RECIPES) + ["passthrough_slices", "frankenmerge"])
def test_in_memory_tensors_are_bitwise_the_merged_files(name, tmp_path, llama_family):
    out = tmp_path / "out"
    if name == "passthrough_slices":
        data = passthrough_slices(llama_family, out)
    elif name == "frankenmerge":
        data = frankenmerge(llama_family, out)
    else:
        data = recipe(llama_family, name, out)
    memory = build_state_dict(project_from_dict(data, tmp_path))
    assert not out.exists()  # the in-memory build writes nothing
    disk = merge_on_disk(data, tmp_path)
    assert_bitwise(disk, memory)
    if name == "dare_ties":  # the seed decides the bits: another seed gives others
        data["method"]["seed"] = 8
        other = build_state_dict(project_from_dict(data, tmp_path))
        assert not torch.equal(other["model.layers.0.mlp.up_proj.weight"], memory["model.layers.0.mlp.up_proj.weight"])


def test_in_memory_tensors_own_their_memory(tmp_path, llama_family):
    # tensors copied as is are copied out of the sources' memory maps (whose storage torch did
    # not allocate, so it cannot resize it): the candidate stays valid and private
    data = passthrough_slices(llama_family, tmp_path / "out")
    memory = build_state_dict(project_from_dict(data, tmp_path))
    assert all(tensor.untyped_storage().resizable() for tensor in memory.values())
    source = tiny_models.load_tensors(llama_family["base"])["model.embed_tokens.weight"]
    assert torch.equal(memory["model.embed_tokens.weight"], source)


def test_bfloat16_merge_with_dtype_settings_is_bitwise(tmp_path, llama_bf16_family):
    data = recipe(llama_bf16_family, "ties", tmp_path / "out")
    data["method"]["compute_dtype"] = "float32"
    data["output"]["dtype"] = "bfloat16"
    memory = build_state_dict(project_from_dict(data, tmp_path))
    assert_bitwise(merge_on_disk(data, tmp_path), memory)
    assert memory["model.norm.weight"].dtype == torch.bfloat16


def test_resident_model_computes_what_the_written_folder_computes(tmp_path, llama_family):
    data = recipe(llama_family, "ties", tmp_path / "out")
    model = build_model(project_from_dict(data, tmp_path))
    merge_on_disk(data, tmp_path)
    written = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(model) is type(written) and not model.training
    assert model.config.num_hidden_layers == written.config.num_hidden_layers
    ids = torch.tensor([[3, 14, 15, 9, 26, 5]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, written(ids).logits)
    assert Path(model.mixcli_tokenizer_path) == Path(llama_family["base"])


def test_resident_model_of_a_tied_family_keeps_the_tie(tmp_path, tied_family):
    data = recipe(tied_family, "linear", tmp_path / "out")
    model = build_model(project_from_dict(data, tmp_path))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    merge_on_disk(data, tmp_path)
    written = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, written(ids).logits)


def test_evaluators_measure_the_resident_model_as_the_written_folder(tmp_path, llama_family):
    (tmp_path / "text.txt").write_text("12+34=46\nabc cba\nhello world\n")
    rows = [{"prompt": "1+1=", "answer": "2"}, {"prompt": "ab", "answer": "c"}]
    (tmp_path / "qa.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    data = recipe(llama_family, "dare_ties", tmp_path / "out")
    model = build_model(project_from_dict(data, tmp_path))
    merge_on_disk(data, tmp_path)
    evaluators = get_registry().evaluators
    settings = {"perplexity": {"data": "text.txt"}, "exact_match": {"data": "qa.jsonl", "max_new_tokens": 4},
                "parameters": {}}
    for name, params in settings.items():
        on_disk = run_evaluator(evaluators[name], tmp_path / "out", dict(params), f"test {name}",
                                base_dir=tmp_path, show_progress=False)
        resident = run_evaluator(evaluators[name], None, dict(params), f"test {name}", base_dir=tmp_path,
                                 model=model, show_progress=False)
        assert resident == on_disk, name
    loss = run_evaluator(evaluators["perplexity"], None, {"data": "text.txt"}, "test", base_dir=tmp_path,
                         model=model, show_progress=False)["loss"]
    assert math.isfinite(loss) and loss > 0


def test_an_evaluator_in_another_dtype_leaves_the_resident_model_as_it_was(tmp_path, llama_family):
    # a float32 merge measured in bfloat16 first: the next float32 measurement must still be
    # the written folder's (an in-place cast would round the resident weights)
    (tmp_path / "text.txt").write_text("12+34=46\nabc cba\nhello world\n")
    data = recipe(llama_family, "task_arithmetic", tmp_path / "out")
    data["output"]["dtype"] = "float32"
    model = build_model(project_from_dict(data, tmp_path))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merge_on_disk(data, tmp_path)
    perplexity = get_registry().evaluators["perplexity"]
    on_disk = run_evaluator(perplexity, tmp_path / "out", {"data": "text.txt", "dtype": "float32"}, "test",
                            base_dir=tmp_path, show_progress=False)
    run_evaluator(perplexity, None, {"data": "text.txt", "dtype": "bfloat16"}, "test", base_dir=tmp_path,
                  model=model, show_progress=False)
    after = run_evaluator(perplexity, None, {"data": "text.txt", "dtype": "float32"}, "test", base_dir=tmp_path,
                          model=model, show_progress=False)
    assert after == on_disk
    assert all(torch.equal(before[k], v) and v.dtype == torch.float32 for k, v in model.state_dict().items())


def test_classification_measures_a_resident_backbone_as_the_folder(tmp_path):
    config = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16,
                                    num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    torch.manual_seed(0)
    transformers.ViTModel(config).save_pretrained(tmp_path / "a")
    transformers.ViTModel(config).save_pretrained(tmp_path / "b")
    folder = tmp_path / "task"
    folder.mkdir()
    generator = torch.Generator().manual_seed(1)
    save_file({"weight": torch.randn(3, 16, generator=generator), "bias": torch.zeros(3)}, folder / "head.safetensors")
    (folder / "test.jsonl").write_text("\n".join(
        json.dumps({"pixel_values": torch.randn(64, generator=generator).tolist(), "label": i % 3})
        for i in range(12)))
    (folder / "task.json").write_text(json.dumps({"task": "t", "data": "test.jsonl"}))
    data = {"models": {"a": {"path": str(tmp_path / "a"), "weight": 0.4}, "b": {"path": str(tmp_path / "b"),
                                                                                 "weight": 0.6}},
            "method": {"name": "linear"}, "output": {"path": str(tmp_path / "out")}}
    model = build_model(project_from_dict(data, tmp_path))
    merge_on_disk(data, tmp_path)
    evaluator = get_registry().evaluators["classification"]
    params = {"tasks": [str(folder)]}
    on_disk = run_evaluator(evaluator, tmp_path / "out", dict(params), "test", show_progress=False)
    resident = run_evaluator(evaluator, None, dict(params), "test", model=model, show_progress=False)
    assert resident == on_disk


def test_project_from_dict_gives_the_errors_of_a_project_file(tmp_path, llama_family):
    good = recipe(llama_family, "linear", tmp_path / "out")
    project = project_from_dict(good, tmp_path)
    assert project.where == "recipe.toml" and project.output_path == tmp_path / "out"
    assert project.models["ft1"].params == {"weight": 0.3}

    def error(data: dict) -> str:
        with pytest.raises(MixcliError) as caught:
            build(project_from_dict(data, tmp_path))
        return str(caught.value)

    assert error({"models": {}, "method": {"name": "linear"}}).startswith("recipe.toml: [models] is empty")
    typo = recipe(llama_family, "linear", tmp_path / "out")
    typo["method"]["name"] = "lnear"
    assert error(typo) == ("recipe.toml: [method] unknown method 'lnear' (did you mean 'linear'?); "
                           "`mixcli list-methods` shows them all")
    unknown = recipe(llama_family, "ties", tmp_path / "out")
    unknown["models"]["ft1"]["densty"] = 0.5
    assert error(unknown).startswith("recipe.toml: [models.ft1]: unknown parameter 'densty' for method 'ties'")
    missing = recipe(llama_family, "linear", tmp_path / "out")
    missing["models"]["ft2"] = {"path": "no/such/model"}
    assert "recipe.toml: [models.ft2]" in error(missing)
    assert error({"models": {"a": None}}) == ("recipe.toml: 'models.a' is None (NoneType), which TOML cannot "
                                              "hold; give a string, number, boolean, list or table")
    # the numbers a search hands over (numpy scalars, tuples) are plain numbers in the recipe
    searched = recipe(llama_family, "linear", tmp_path / "out")
    searched["models"]["ft1"]["weight"] = np.float64(0.25)
    searched["method"]["normalize"] = np.bool_(True)
    searched["models"]["ft2"]["weight"] = (np.float32(0.5), 0.75)
    project = project_from_dict(searched, tmp_path)
    assert "weight = 0.25" in project.text and "weight = [0.5, 0.75]" in project.text
    assert "normalize = true" in project.text


def test_a_method_with_several_outputs_is_refused_in_memory(tmp_path, llama_family):
    data = {"models": {"base": str(llama_family["base"]), "ft1": str(llama_family["ft1"])},
            "method": {"name": "model_recombination"}, "output": {"path": str(tmp_path / "out")}}
    with pytest.raises(MixcliError, match=r"^recipe.toml: \[method\] 'model_recombination' makes 2 models"):
        build(project_from_dict(data, tmp_path))


def test_a_previous_candidate_is_overwritten_in_place_bitwise(tmp_path, llama_family):
    first = recipe(llama_family, "ties", tmp_path / "out")
    model = build_model(project_from_dict(first, tmp_path))
    pointers = {name: t.data_ptr() for name, t in model.state_dict().items()}
    second = recipe(llama_family, "ties", tmp_path / "out")
    second["models"]["ft1"]["weight"], second["method"]["density"] = 0.9, 0.3
    again = build_model(project_from_dict(second, tmp_path), model=model)
    assert again is model
    assert {name: t.data_ptr() for name, t in again.state_dict().items()} == pointers  # nothing allocated
    assert_bitwise(build_state_dict(project_from_dict(second, tmp_path)), dict(again.state_dict()))
    fresh = build_model(project_from_dict(second, tmp_path))
    ids = torch.tensor([[3, 14, 15, 9, 26]])
    with torch.no_grad():
        assert torch.equal(again(ids).logits, fresh(ids).logits)
    # another shape (a passthrough of 6 layers) cannot reuse it: a new model
    other = build_model(project_from_dict(passthrough_slices(llama_family, tmp_path / "out"), tmp_path), model=model)
    assert other is not model and other.config.num_hidden_layers == 6
