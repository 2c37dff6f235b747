"""Architecture knowledge end to end: tied and untied heads, tensors only some models hold,
layer counts checked against the tensors, and one config remap for every layer map."""

import json
import shutil

import pytest
import torch
import transformers
from click.testing import CliRunner
from safetensors.torch import save_file

import tiny_models
from conftest import write_project
from mixcli import MixcliError
from mixcli.architecture import head_source, is_tied, layout_of, map_config, tensor_role
from mixcli.checkpoint import Checkpoint, open_safetensors, read_config
from mixcli.cli import cli


def merge(project):
    result = CliRunner().invoke(cli, ["merge", str(project)])
    assert result.exit_code == 0, result.output
    return result


def fails(project, message):
    result = CliRunner().invoke(cli, ["merge", str(project)])
    assert result.exit_code == 1, result.output
    assert result.output.strip() == f"Error: {message}", result.output
    assert not (project.parent / "out").exists()


def opened(folder, name="m"):
    return Checkpoint(name, folder, read_config(folder, name), open_safetensors(folder, name))


def linear(tmp_path, models: dict, out: str, method="linear", extra=""):
    lines = "\n".join(f'{name} = "{path}"' for name, path in models.items())
    return write_project(tmp_path, f"""
[models]
{lines}
[method]
name = "{method}"
weight = 1.0
{extra}
[output]
path = "{out}"
""", f"{out}.toml")


def test_roles_and_tied_embeddings_of_the_fixtures(qwen2_tied_family, qwen2_sharded_family):
    tied, untied = opened(qwen2_tied_family["ft1"]), opened(qwen2_sharded_family["ft1"])
    assert len({info.file.path for info in untied.tensors.values()}) > 1  # really sharded
    assert layout_of(tied.config).name == "transformers"
    assert is_tied(tied) and not is_tied(untied)
    assert head_source(tied) == "model.embed_tokens.weight" and head_source(untied) == "lm_head.weight"
    roles = {name: tensor_role(untied, name) for name in ("model.embed_tokens.weight", "lm_head.weight",
                                                          "model.norm.weight", "model.layers.1.self_attn.q_proj.bias")}
    assert roles == {"model.embed_tokens.weight": "pre", "lm_head.weight": "head", "model.norm.weight": "post",
                     "model.layers.1.self_attn.q_proj.bias": "layer"}


def test_tied_and_untied_inputs_give_the_same_head_in_either_order(tmp_path, qwen2_tied_family,
                                                                   qwen2_sharded_family):
    tied, untied = qwen2_tied_family["ft1"], qwen2_sharded_family["ft1"]
    merge(linear(tmp_path, {"t": tied, "u": untied}, "tied_first"))
    merge(linear(tmp_path, {"u": untied, "t": tied}, "untied_first"))
    first, second = (tiny_models.load_tensors(tmp_path / n) for n in ("tied_first", "untied_first"))
    assert first.keys() == second.keys() and "lm_head.weight" in first
    assert all(torch.equal(first[k], second[k]) for k in first)  # byte-identical, head included
    t, u = tiny_models.load_tensors(tied), tiny_models.load_tensors(untied)
    assert torch.allclose(first["lm_head.weight"], (t["model.embed_tokens.weight"] + u["lm_head.weight"]) / 2,
                          atol=1e-7)
    bias = "model.layers.2.self_attn.k_proj.bias"  # Qwen2's biases merge like any tensor
    assert torch.allclose(first[bias], (t[bias] + u[bias]) / 2, atol=1e-7)
    for name in ("tied_first", "untied_first"):
        assert json.loads((tmp_path / name / "config.json").read_text())["tie_word_embeddings"] is False
        model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / name)
        assert torch.equal(model.lm_head.weight.detach(), first["lm_head.weight"])
        assert torch.isfinite(tiny_models.logits(tmp_path / name)).all()


def slices(tmp_path, first, second, out):
    models = f'a = "{first}"' + ("" if first == second else f'\nb = "{second}"')
    last = "a" if first == second else "b"
    return write_project(tmp_path, f"""
[models]
{models}
[method]
name = "passthrough"
[[slices]]
sources = [{{ model = "a", layer_range = [0, 2] }}]
[[slices]]
sources = [{{ model = "{last}", layer_range = [2, 4] }}]
[output]
path = "{out}"
""", f"{out}.toml")


def test_slices_take_the_head_from_the_last_slice_even_when_it_is_tied(tmp_path, llama_family, tied_family):
    untied, tied = llama_family["ft1"], tied_family["ft1"]
    u, t = tiny_models.load_tensors(untied), tiny_models.load_tensors(tied)
    merge(slices(tmp_path, untied, tied, "tied_last"))
    out = tiny_models.load_tensors(tmp_path / "tied_last")
    assert torch.equal(out["model.embed_tokens.weight"], u["model.embed_tokens.weight"])
    assert torch.equal(out["lm_head.weight"], t["model.embed_tokens.weight"])  # the tied model's head
    assert torch.equal(out["model.norm.weight"], t["model.norm.weight"])
    config = json.loads((tmp_path / "tied_last" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "tied_last")
    assert torch.equal(model.lm_head.weight.detach(), t["model.embed_tokens.weight"])

    merge(slices(tmp_path, tied, untied, "tied_first"))
    out = tiny_models.load_tensors(tmp_path / "tied_first")
    assert torch.equal(out["model.embed_tokens.weight"], t["model.embed_tokens.weight"])
    assert torch.equal(out["lm_head.weight"], u["lm_head.weight"])
    assert json.loads((tmp_path / "tied_first" / "config.json").read_text())["tie_word_embeddings"] is False

    merge(slices(tmp_path, tied, tied, "both_tied"))  # one tied model at both ends: stays tied
    out = tiny_models.load_tensors(tmp_path / "both_tied")
    assert "lm_head.weight" not in out
    assert json.loads((tmp_path / "both_tied" / "config.json").read_text())["tie_word_embeddings"] is True


def with_extra_tensor(tmp_path, source, name="score.weight"):
    """A copy of ``source`` holding one more non-layer tensor, in a second file."""
    folder = tmp_path / f"extra_{source.name}"
    shutil.copytree(source, folder)
    extra = torch.arange(128, dtype=torch.float32).reshape(2, 64)
    save_file({name: extra}, str(folder / "model-extra.safetensors"))
    return folder, extra


def test_a_tensor_only_some_models_hold_follows_the_method(tmp_path, llama_family):
    extra_folder, extra = with_extra_tensor(tmp_path, llama_family["ft1"])
    other = llama_family["ft2"]
    # linear merges it from the models that have it, whichever comes first
    merge(linear(tmp_path, {"b": other, "a": extra_folder}, "lacking_first"))
    assert torch.equal(tiny_models.load_tensors(tmp_path / "lacking_first")["score.weight"], extra)
    # slerp copies it from the single model that has it
    merge(write_project(tmp_path, f"""
[models]
a = "{extra_folder}"
b = "{other}"
[method]
name = "slerp"
base = "b"
t = 0.5
[output]
path = "slerped"
""", "slerp.toml"))
    assert torch.equal(tiny_models.load_tensors(tmp_path / "slerped")["score.weight"], extra)
    # task arithmetic needs the base's version
    project = write_project(tmp_path, f"""
[models]
a = "{extra_folder}"
b = "{other}"
[method]
name = "task_arithmetic"
base = "b"
weight = 1.0
[output]
path = "out"
""", "ta.toml")
    fails(project, "ta.toml: [models]: tensor 'score.weight' is in model(s) 'a' but not in the base 'b'; "
                   "method 'task_arithmetic' cannot merge it without the base's")


def test_model_stock_copies_the_bases_partial_tensor_or_leaves_it_out_with_a_warning(tmp_path, llama_family):
    extra_base, extra = with_extra_tensor(tmp_path, llama_family["base"])
    extra_ft1, _ = with_extra_tensor(tmp_path, llama_family["ft1"])

    def stock(base, a, b, out):
        return write_project(tmp_path, f"""
[models]
base = "{base}"
a = "{a}"
b = "{b}"
[method]
name = "model_stock"
base = "base"
[output]
path = "{out}"
""", f"{out}.toml")

    merge(stock(extra_base, llama_family["ft1"], llama_family["ft2"], "from_base"))
    assert torch.equal(tiny_models.load_tensors(tmp_path / "from_base")["score.weight"], extra)
    result = merge(stock(llama_family["base"], extra_ft1, llama_family["ft2"], "left_out"))
    assert "score.weight" not in tiny_models.load_tensors(tmp_path / "left_out")
    assert ("warning: left_out.toml: [models]: tensor 'score.weight' is in model(s) 'a' but not in the base "
            "'base'; method 'model_stock' leaves it out of the output") in " ".join(result.output.split())


def test_a_config_whose_layer_count_disagrees_with_its_tensors_is_an_error(tmp_path, llama_family):
    folder = tmp_path / "liar"
    shutil.copytree(llama_family["ft1"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] = 6
    (folder / "config.json").write_text(json.dumps(config))
    message = (f"project.toml: [models.a]: {folder / 'config.json'} says num_hidden_layers = 6 but its "
               "tensors hold 4 layers (model.layers.0..3); fix the config or the weights")
    fails(write_project(tmp_path, f"""
[models]
a = "{folder}"
b = "{llama_family['ft2']}"
[method]
name = "linear"
weight = 1.0
[output]
path = "out"
"""), message)
    fails(write_project(tmp_path, f"""
[models]
a = "{folder}"
[method]
name = "depth_upscaling"
layers = ["0:4"]
[output]
path = "out"
"""), message)
    fails(write_project(tmp_path, f"""
[models]
b = "{llama_family['ft2']}"
a = "{folder}"
[method]
name = "model_recombination"
num_outputs = 1
[output]
path = "out"
"""), message.replace("[models.a]", "[models]"))


def sliding_qwen2(folder, layers: int, window_layers: int, seed: int):
    """A Qwen2 whose layers from ``window_layers`` on use the sliding window (layer_types say so)."""
    torch.manual_seed(seed)
    cfg = tiny_models.config("qwen2", layers=layers)
    cfg.use_sliding_window, cfg.sliding_window, cfg.max_window_layers = True, 32, window_layers
    cfg.layer_types = ["full_attention"] * window_layers + ["sliding_attention"] * (layers - window_layers)
    return tiny_models.save(transformers.Qwen2ForCausalLM(cfg).eval(), folder)


def test_slices_config_takes_per_layer_entries_from_each_layers_source(tmp_path):
    donor = sliding_qwen2(tmp_path / "donor", 4, 4, 8)  # every layer full attention
    deep = sliding_qwen2(tmp_path / "deep", 6, 3, 9)  # deeper than the donor: layers 3..5 sliding
    project = write_project(tmp_path, f"""
[models]
donor = "{donor}"
deep = "{deep}"
[method]
name = "passthrough"
[[slices]]
sources = [{{ model = "donor", layer_range = [0, 2] }}]
[[slices]]
sources = [{{ model = "deep", layer_range = [3, 6] }}]
[output]
path = "out"
""")
    merge(project)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_hidden_layers"] == 5
    assert config["layer_types"] == ["full_attention"] * 2 + ["sliding_attention"] * 3
    assert config["max_window_layers"] == 2  # the first two layers are the full-attention ones
    loaded = transformers.AutoConfig.from_pretrained(tmp_path / "out")
    assert loaded.layer_types == config["layer_types"]
    assert torch.isfinite(tiny_models.logits(tmp_path / "out")).all()


def test_map_config_reads_each_models_own_lists():
    configs = {"a": {"num_hidden_layers": 2, "layer_types": ["x", "y"], "mlp_only_layers": [1]},
               "b": {"num_hidden_layers": 3, "layer_types": ["p", "q", "r"], "mlp_only_layers": [2]}}
    out = map_config(configs, "a", [("a", 0), ("b", 2), ("b", 1), ("a", 1)], "here")
    assert out == {"num_hidden_layers": 4, "layer_types": ["x", "r", "q", "y"], "mlp_only_layers": [1, 3]}
    with pytest.raises(MixcliError, match="field 'layer_types' has one entry per layer in some models but not in 'c'"):
        map_config(dict(configs, c={"num_hidden_layers": 3}), "a", [("c", 0)], "here")
