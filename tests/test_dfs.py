"""DFS materialisation (mixcli-evolve): a layer path becomes a stock model when every input
scale is 1, and the scaled decoder otherwise; built in memory or written by `mixcli merge`,
loaded through transformers' Auto classes, generating alike with and without the KV cache."""

import json
from pathlib import Path

import pytest
import torch
import transformers
from click.testing import CliRunner

import tiny_models
from mixcli.cli import cli
from mixcli.errors import MixcliError
from mixcli.inmemory import build_model, build_state_dict
from mixcli.plugins import register_architectures
from mixcli.project import project_from_dict
from mixcli.tomlwrite import dumps
from mixcli_evolve.dfs import PathStep, decode_indicator, path_recipe

LAYER = "model.layers.{}."


def merge(data: dict, folder: Path) -> Path:
    project = folder / "project.toml"
    project.write_text(dumps(data))
    result = CliRunner().invoke(cli, ["merge", str(project), "--no-progress"])
    assert result.exit_code == 0, result.output
    return Path(data["output"]["path"])


def sources(family) -> dict[str, str]:
    return {"base": str(family["base"]), "ft1": str(family["ft1"])}


def test_decode_indicator_follows_the_slots_and_the_scale_matrix():
    # layers a0 a1 b0, twice: on-slots 0 (a0), 2 (b0), 3 (a0), 4 (a1)
    scales = [[1.0, 0.5, 0.25], [2.0, 1.0, 3.0], [0.75, 4.0, 1.0]]
    steps = decode_indicator([1.0, -1.0, 0.3, 0.5, 2.0, 0.0], {"a": 2, "b": 1}, repeats=2, scales=scales)
    assert steps == [PathStep("a", 0, 1.0), PathStep("b", 0, 0.25), PathStep("a", 0, 0.75), PathStep("a", 1, 0.5)]
    assert decode_indicator([1, 1, 1], {"a": 2, "b": 1}) == [PathStep("a", 0), PathStep("a", 1), PathStep("b", 0)]
    with pytest.raises(MixcliError, match=r"^layer path: the indicator has 5 genes but 3 layers × 2 repeats = 6"):
        decode_indicator([1] * 5, {"a": 2, "b": 1}, repeats=2)


def test_all_on_indicator_with_unit_scales_is_the_concatenation_of_the_sources(tmp_path, llama_family):
    models = sources(llama_family)
    steps = decode_indicator([1.0] * 8, {"base": 4, "ft1": 4}, repeats=1, scales=[[1.0] * 8] * 8)
    data = path_recipe(steps, models, output=str(tmp_path / "out"))
    tensors = build_state_dict(project_from_dict(data, tmp_path))
    base, ft1 = (tiny_models.load_tensors(llama_family[m]) for m in ("base", "ft1"))
    expected = {name: t for name, t in base.items() if not name.startswith("model.layers.")}
    for k in range(8):
        source, index = (base, k) if k < 4 else (ft1, k - 4)
        for name, tensor in source.items():
            if name.startswith(LAYER.format(index)):
                expected[name.replace(LAYER.format(index), LAYER.format(k))] = tensor
    expected["model.norm.weight"] = ft1["model.norm.weight"]  # the head of the last step's model
    expected["lm_head.weight"] = ft1["lm_head.weight"]
    assert set(tensors) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(tensors[name], tensor), name
    out = merge(data, tmp_path)  # stock architecture: stock transformers loads it, no plugin needed
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(model) is transformers.LlamaForCausalLM and model.config.num_hidden_layers == 8
    assert "layer_input_scales" not in model.config.to_dict()


SCALED = [PathStep("base", 0), PathStep("base", 1, 0.8), PathStep("ft1", 1, 1.25), PathStep("base", 1, 0.9),
          PathStep("ft1", 3, 1.1)]


def reference_logits(unit_model, scales, ids):
    """The scaled path computed by hand on the stock model of the same layers."""
    inner = unit_model.model
    hidden = inner.embed_tokens(ids)
    positions = torch.arange(ids.shape[1]).unsqueeze(0)
    embeddings = inner.rotary_emb(hidden, position_ids=positions)
    mask = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)[None, None]
    for layer, scale in zip(inner.layers, scales):
        hidden = layer(hidden * scale, attention_mask=mask, position_embeddings=embeddings, position_ids=positions)
    return unit_model.lm_head(inner.norm(hidden))


def test_scaled_path_saved_loads_through_auto_classes_and_matches_the_in_memory_candidate(tmp_path, llama_family):
    data = path_recipe(SCALED, sources(llama_family), output=str(tmp_path / "out"))
    candidate = build_model(project_from_dict(data, tmp_path))
    assert type(candidate).__name__ == "MixcliDfsLlamaForCausalLM"
    assert candidate.config.layer_input_scales == [s.scale for s in SCALED]
    out = merge(data, tmp_path)
    register_architectures()  # what mixcli does before loading; the plugin registers the variant
    written = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(written) is type(candidate)
    assert transformers.AutoConfig.from_pretrained(out).model_type == "mixcli_dfs_llama"
    ids = torch.tensor([[3, 14, 15, 9, 26, 5, 35]])
    unit = [PathStep(s.model, s.layer) for s in SCALED]
    stock = build_model(project_from_dict(path_recipe(unit, sources(llama_family)), tmp_path))
    assert type(stock) is transformers.LlamaForCausalLM
    with torch.no_grad():
        logits = candidate(ids).logits
        assert torch.equal(written(ids).logits, logits)
        assert torch.allclose(reference_logits(stock, [s.scale for s in SCALED], ids), logits, atol=1e-5)
        assert not torch.allclose(stock(ids).logits, logits, atol=1e-3)  # the scales do act


def test_generation_with_the_kv_cache_equals_generation_without(tmp_path, llama_family):
    data = path_recipe(SCALED, sources(llama_family), output=str(tmp_path / "out"))
    candidate = build_model(project_from_dict(data, tmp_path))
    assert [layer.self_attn.layer_idx for layer in candidate.model.layers] == list(range(len(SCALED)))
    register_architectures()
    written = transformers.AutoModelForCausalLM.from_pretrained(merge(data, tmp_path)).eval()
    ids = torch.tensor([[3, 14, 15, 9]])
    runs = []
    for model in (candidate, written):
        for cache in (True, False):
            with torch.no_grad():
                runs.append(model.generate(ids, do_sample=False, max_new_tokens=16, min_new_tokens=16,
                                           use_cache=cache, pad_token_id=0))
    assert runs[0].shape[1] == 4 + 16
    assert all(torch.equal(run, runs[0]) for run in runs[1:])


def test_layer_path_mistakes_are_one_line(tmp_path, llama_family):
    def error(layers, **method) -> str:
        data = {"models": sources(llama_family), "method": {"name": "layer_path", "layers": layers, **method}}
        with pytest.raises(MixcliError) as caught:
            build_state_dict(project_from_dict(data, tmp_path))
        return str(caught.value)

    assert error([{"model": "base", "layer": 0}, {"model": "ft1", "layr": 1}]) == (
        "recipe.toml: [method] layers entry 2: unknown key 'layr' (did you mean 'layer'?); allowed: model, "
        "layer, scale")
    assert error([{"model": "base", "layer": 0}, {"model": "ft1", "layer": 1, "scale": "big"}]) == (
        "recipe.toml: [method] layers entry 2: scale must be a finite number, got 'big'")
    assert error([{"model": "base", "layer": 0}, {"model": "ft1", "layer": 9}]).startswith(
        "recipe.toml: [method]: layer 9 of model 'ft1' is out of range: it has 4 layers")
    assert error([{"model": "base", "layer": 0}]) == (
        "recipe.toml: [models] model 'ft1' is not on the path nor embed_from or head_from; remove it")
    with pytest.raises(MixcliError, match="^layer path: the path is empty"):
        path_recipe([], sources(llama_family))


def test_method_dtype_casts_the_path(tmp_path, llama_family):
    data = path_recipe(SCALED, sources(llama_family), output=str(tmp_path / "out"), dtype="bfloat16")
    tensors = build_state_dict(project_from_dict(data, tmp_path))
    ft1 = tiny_models.load_tensors(llama_family["ft1"])
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    assert torch.equal(tensors["model.layers.2.mlp.up_proj.weight"], ft1["model.layers.1.mlp.up_proj.weight"].bfloat16())
    config = json.loads((merge(data, tmp_path) / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["model_type"] == "mixcli_dfs_llama"
