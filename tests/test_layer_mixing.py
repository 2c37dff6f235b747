"""Layer-level mixing (mixcli-layers): frankenmerge, depth_upscaling, model_recombination, on
tiny seeded models through the CLI. Outputs are checked tensor by tensor against their sources."""

import json
import struct
from collections import Counter

import pytest
import torch
import transformers
from click.testing import CliRunner

import tiny_models
from conftest import write_project
from mixcli import MixcliError
from mixcli.cli import cli
from mixcli.core import prepare
from mixcli.architecture import map_config
from mixcli_layers.depth_upscaling import renumber_layers, upscale_model
from mixcli_layers.layer_spec import parse_layer_spec

SUFFIXES = ("self_attn.q_proj.weight", "self_attn.o_proj.weight", "mlp.down_proj.weight",
            "input_layernorm.weight", "post_attention_layernorm.weight")


@pytest.fixture(scope="module")
def llama8(tmp_path_factory):
    return tiny_models.build_family(tmp_path_factory.mktemp("llama8"), "llama", experts=2, seed=5, layers=8)


@pytest.fixture(scope="module")
def narrow(tmp_path_factory):
    """A Llama of another width (hidden 32): its layers cannot be stacked with the others."""
    cfg = tiny_models.config("llama", 4)
    cfg.hidden_size, cfg.intermediate_size = 32, 80
    torch.manual_seed(9)
    return tiny_models.save(transformers.LlamaForCausalLM(cfg), tmp_path_factory.mktemp("narrow") / "m")


def merge(project, *args):
    result = CliRunner().invoke(cli, ["merge", str(project), *map(str, args)])
    assert result.exit_code == 0, result.output
    return result


def fails(project, *fragments):
    result = CliRunner().invoke(cli, ["merge", str(project)])
    assert result.exit_code == 1, result.output
    message = result.output.strip()
    assert message.count("\n") == 0 and message.startswith("Error: "), message  # one line
    for fragment in fragments:
        assert fragment in message, message
    assert not (project.parent / "out").exists()
    assert not list(project.parent.glob(".out.tmp-*"))
    return message


def generate(folder_or_model, use_cache: bool) -> list[int]:
    model = folder_or_model
    if not isinstance(model, torch.nn.Module):
        model = transformers.AutoModelForCausalLM.from_pretrained(folder_or_model)
    model.eval()
    ids = tiny_models.tokenizer()("12+34=5", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=20, min_new_tokens=20, do_sample=False,
                             use_cache=use_cache, pad_token_id=0)
    return out[0].tolist()


# ---------------------------------------------------------------- the layer-spec grammar

@pytest.mark.parametrize("spec, want", [
    ([0, 1, 1, 0], [0, 1, 1, 0]),
    (["0:12", "6:12"], list(range(12)) + list(range(6, 12))),
    ([0, 2, 4, "range(6,12)"], [0, 2, 4, 6, 7, 8, 9, 10, 11]),
    (["::2"], [0, 2, 4, 6, 8, 10]),
    (["range(11,-1,-1)"], list(range(11, -1, -1))),
    (["range(11,5,-1)"], [11, 10, 9, 8, 7, 6]),
    (["0:3, range(0, 2), 7"], [0, 1, 2, 0, 1, 7]),
    ([" 1 : 9 : 3 ", [10, 12]], [1, 4, 7, 10, 11]),
    ("4:", [4, 5, 6, 7, 8, 9, 10, 11]),
])
def test_layer_spec_vectors(spec, want):
    assert parse_layer_spec(spec, 12, "p.toml: [method] layers") == want


@pytest.mark.parametrize("spec, fragment", [
    (["range(-4,0)"], "selects layer -4, which is out of range"),
    ([-1], "layer item -1 is negative"),
    (["-4:"], "uses the negative number -4"),
    (["__import__('os')"], "is not valid"),
    (["range(0, 4) + 1"], "is not valid"),
    ([12], "selects layer 12, which is out of range: the model has 12 layers (0..11)"),
    (["5:5"], "selects no layers"),
    (["range(0,4,0)"], "has step 0"),
    (["0:4:0"], "has step 0"),
    ([], "the layer spec is empty"),
    (["0:4,"], "empty layer item"),
    ([1.5], "layer item 1.5 is not valid"),
    ([[0, 4, 8]], "a pair must be [start, stop]"),
    (["0-5"], "for layers 0..5 write 0:6"),
])
def test_layer_spec_rejections(spec, fragment):
    with pytest.raises(MixcliError) as error:
        parse_layer_spec(spec, 12, "p.toml: [method] layers")
    assert fragment in str(error.value) and str(error.value).startswith("p.toml: [method] layers")


# ---------------------------------------------------------------- depth up-scaling

def upscale(tmp_path, source, layers, out="out", extra=""):
    project = write_project(tmp_path, f"""
[models]
m = "{source}"
[method]
name = "depth_upscaling"
layers = {layers}
{extra}
[output]
path = "{out}"
""", f"{out}.toml")
    merge(project)
    return tmp_path / out


def test_solar_spec_stacks_layers_and_caches_consistently(tmp_path, llama8):
    out = upscale(tmp_path, llama8["base"], '["0:6", "2:8"]')
    mapping = [0, 1, 2, 3, 4, 5, 2, 3, 4, 5, 6, 7]
    src, dst = tiny_models.load_tensors(llama8["base"]), tiny_models.load_tensors(out)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 12
    assert len(dst) == 3 + 9 * 12
    for k, i in enumerate(mapping):
        for suffix in SUFFIXES:
            assert torch.equal(dst[f"model.layers.{k}.{suffix}"], src[f"model.layers.{i}.{suffix}"])
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(dst[name], src[name])
    layer_map = json.loads((out / "layer_map.json").read_text())
    assert [e["layer"] for e in layer_map["layers"]] == mapping and layer_map["layer_spec"] == ["0:6", "2:8"]
    for k, entry in enumerate(layer_map["layers"]):  # the map reproduces the output
        assert torch.equal(dst[f"model.layers.{k}.mlp.up_proj.weight"],
                           src[f"model.layers.{entry['layer']}.mlp.up_proj.weight"])
    # duplicated layers are independent tensors: distinct byte ranges in the file
    raw = (out / "model.safetensors").read_bytes()
    header = json.loads(raw[8:8 + struct.unpack("<Q", raw[:8])[0]])
    offsets = [tuple(v["data_offsets"]) for k, v in header.items() if k != "__metadata__"]
    assert len(set(offsets)) == len(offsets)
    # KV cache: one slot per layer after reloading, and the same for an in-memory upscale
    reloaded = generate(out, True)
    assert reloaded == generate(out, False)
    base = transformers.AutoModelForCausalLM.from_pretrained(llama8["base"])
    memory = upscale_model(base, ["0:6", "2:8"])
    assert [layer.self_attn.layer_idx for layer in memory.model.layers] == list(range(12))
    assert memory.config.num_hidden_layers == 12 and len(base.model.layers) == 8
    assert generate(memory, True) == generate(memory, False) == reloaded


def test_identity_spec_reproduces_the_model(tmp_path, llama8):
    out = upscale(tmp_path, llama8["ft1"], '["0:8"]')
    src, dst = tiny_models.load_tensors(llama8["ft1"]), tiny_models.load_tensors(out)
    assert src.keys() == dst.keys() and all(torch.equal(src[k], dst[k]) for k in src)
    assert torch.equal(tiny_models.logits(out), tiny_models.logits(llama8["ft1"]))


def test_renumbering_fixes_duplicated_layer_indices(llama8):
    """The peer defect: deep-copied layers keep their layer_idx, copies share a KV-cache slot."""
    import copy

    model = transformers.AutoModelForCausalLM.from_pretrained(llama8["base"])
    mapping = [0, 1, 2, 3, 4, 5, 2, 3, 4, 5, 6, 7]
    model.model.layers = torch.nn.ModuleList(copy.deepcopy(model.model.layers[i]) for i in mapping)
    model.config.num_hidden_layers = len(mapping)
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == mapping
    assert generate(model, True) != generate(model, False)  # what FusionBench's copy gives
    assert renumber_layers(model) >= len(mapping)
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == list(range(len(mapping)))
    assert generate(model, True) == generate(model, False)


@pytest.mark.parametrize("example, folder", [("depth_upscaling", "upscaled"), ("frankenmerge", "frankenmerged"),
                                             ("model_recombination", "recombined/model_2")])
def test_example_projects_run(tmp_path, llama8, example, folder):
    from pathlib import Path

    text = (Path(__file__).parent.parent / "examples" / f"{example}.toml").read_text()
    (tmp_path / "models").mkdir()
    for name in ("base", "ft1", "ft2"):
        (tmp_path / "models" / name).symlink_to(llama8[name])
    merge(write_project(tmp_path, text, f"{example}.toml"))
    out = tmp_path / folder
    layers = 8 if example == "model_recombination" else 12
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == layers
    assert torch.isfinite(tiny_models.logits(out)).all()


def test_upscaled_models_feed_a_ties_merge(tmp_path, llama8):
    ups = {name: upscale(tmp_path, llama8[name], '["0:6", "2:8"]', out=f"up_{name}")
           for name in ("base", "ft1", "ft2")}
    project = write_project(tmp_path, f"""
[models]
base = "{ups['base']}"
a = "{ups['ft1']}"
b = "{ups['ft2']}"
[method]
name = "ties"
base = "base"
weight = 0.5
density = 0.5
[output]
path = "merged"
""")
    merge(project)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert model.config.num_hidden_layers == 12
    assert torch.isfinite(tiny_models.logits(tmp_path / "merged")).all()
    assert generate(tmp_path / "merged", True) == generate(tmp_path / "merged", False)


@pytest.mark.parametrize("layers, fragments", [
    ('["0:9"]', ["layers: layer item '0:9' selects layer 8, which is out of range", "has 8 layers (0..7)"]),
    ("[]", ["[method] layers: the layer spec is empty"]),
    ('["0-"]', ["layer item '0-' is not valid", "accepted forms"]),
    ('["a-b"]', ["layer item 'a-b' is not valid"]),
    ('["6:2"]', ["layer item '6:2' selects no layers"]),
    ('["0-5, 2-7"]', ["layer item '0-5' is not valid", "write 0:6"]),
    ('"0:4"', ["parameter 'layers' must be a list"]),
])
def test_bad_layer_specs_fail_with_one_line(tmp_path, llama8, layers, fragments):
    project = write_project(tmp_path, f"""
[models]
m = "{llama8['base']}"
[method]
name = "depth_upscaling"
layers = {layers}
[output]
path = "out"
""")
    message = fails(project, *fragments)
    assert "project.toml" in message


# ---------------------------------------------------------------- frankenmerge

def test_frankenmerge_slices_scale_and_donors(tmp_path, llama8):
    project = write_project(tmp_path, f"""
[models]
a = "{llama8['ft1']}"
b = "{llama8['ft2']}"
[method]
name = "frankenmerge"
layers = [{{ model = "a", range = [0, 3] }},
          {{ model = "b", layers = ["1:3", 1], scale = [{{ filter = "o_proj", value = [1.0, 0.5] }}, {{ value = 1.0 }}] }}]
[output]
path = "out"
""")
    merge(project)
    a, b = tiny_models.load_tensors(llama8["ft1"]), tiny_models.load_tensors(llama8["ft2"])
    out = tiny_models.load_tensors(tmp_path / "out")
    sources = [(a, 0), (a, 1), (a, 2), (b, 1), (b, 2), (b, 1)]
    for k, (model, i) in enumerate(sources):
        assert torch.equal(out[f"model.layers.{k}.mlp.down_proj.weight"], model[f"model.layers.{i}.mlp.down_proj.weight"])
    o = "model.layers.{}.self_attn.o_proj.weight"
    assert torch.equal(out[o.format(2)], a[o.format(2)])
    assert torch.equal(out[o.format(3)], b[o.format(1)])  # gradient restarts per slice: p = 0 → 1.0
    assert torch.equal(out[o.format(4)], b[o.format(2)] * 0.75)  # p = 0.5
    assert torch.equal(out[o.format(5)], b[o.format(1)] * 0.5)  # p = 1
    assert torch.equal(out["model.embed_tokens.weight"], a["model.embed_tokens.weight"])
    assert torch.equal(out["lm_head.weight"], b["lm_head.weight"])
    assert torch.equal(out["model.norm.weight"], b["model.norm.weight"])
    layer_map = json.loads((tmp_path / "out" / "layer_map.json").read_text())
    assert (layer_map["embed_from"], layer_map["head_from"]) == ("a", "b")
    assert [(e["model"], e["layer"]) for e in layer_map["layers"]] == [("a", 0), ("a", 1), ("a", 2),
                                                                       ("b", 1), ("b", 2), ("b", 1)]
    assert generate(tmp_path / "out", True) == generate(tmp_path / "out", False)


def test_frankenmerge_empty_final_entry_and_explicit_donors(tmp_path, llama8, tied_family):
    project = write_project(tmp_path, f"""
[models]
a = "{llama8['ft1']}"
b = "{llama8['ft2']}"
[method]
name = "frankenmerge"
layers = [{{ model = "a", range = [0, 4] }}, {{ model = "b", range = [8, 8] }}]
[output]
path = "one"
""", "one.toml")
    merge(project)
    a, b = tiny_models.load_tensors(llama8["ft1"]), tiny_models.load_tensors(llama8["ft2"])
    out = tiny_models.load_tensors(tmp_path / "one")
    assert json.loads((tmp_path / "one" / "config.json").read_text())["num_hidden_layers"] == 4
    assert torch.equal(out["lm_head.weight"], b["lm_head.weight"])
    assert torch.equal(out["model.layers.3.mlp.up_proj.weight"], a["model.layers.3.mlp.up_proj.weight"])
    # explicit donors: a tied model's head is its embedding
    tied = write_project(tmp_path, f"""
[models]
t = "{tied_family['ft1']}"
u = "{tied_family['ft2']}"
[method]
name = "frankenmerge"
head_from = "u"
layers = [{{ model = "t", range = [0, 4] }}]
[output]
path = "two"
""", "two.toml")
    merge(tied)
    t, u = tiny_models.load_tensors(tied_family["ft1"]), tiny_models.load_tensors(tied_family["ft2"])
    out = tiny_models.load_tensors(tmp_path / "two")
    assert torch.equal(out["model.embed_tokens.weight"], t["model.embed_tokens.weight"])
    assert torch.equal(out["lm_head.weight"], u["model.embed_tokens.weight"])
    assert json.loads((tmp_path / "two" / "config.json").read_text())["tie_word_embeddings"] is False
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "two")
    assert torch.equal(model.lm_head.weight.detach(), u["model.embed_tokens.weight"])


def test_core_passthrough_accepts_a_zero_length_final_slice(tmp_path, llama8):
    project = write_project(tmp_path, f"""
[models]
a = "{llama8['ft1']}"
b = "{llama8['ft2']}"
[method]
name = "passthrough"
[[slices]]
sources = [{{ model = "a", layer_range = [0, 3] }}]
[[slices]]
sources = [{{ model = "b", layer_range = [8, 8] }}]
[output]
path = "out"
""")
    merge(project)
    a, b = tiny_models.load_tensors(llama8["ft1"]), tiny_models.load_tensors(llama8["ft2"])
    out = tiny_models.load_tensors(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 3
    assert torch.equal(out["model.layers.2.mlp.up_proj.weight"], a["model.layers.2.mlp.up_proj.weight"])
    assert torch.equal(out["model.embed_tokens.weight"], a["model.embed_tokens.weight"])
    assert torch.equal(out["lm_head.weight"], b["lm_head.weight"])
    assert torch.equal(out["model.norm.weight"], b["model.norm.weight"])
    (tmp_path / "out").rename(tmp_path / "kept")
    only_empty = write_project(tmp_path, project.read_text().replace("[0, 3]", "[2, 2]"), "empty.toml")
    fails(only_empty, "[[slices]] #1 source 1: a zero-length layer_range [2, 2] is allowed only in the last of several")


@pytest.mark.parametrize("layers, fragments", [
    ('[{ model = "a", range = [0, 3] }, { model = "n", range = [0, 2] }]',
     ["has shape [52, 64] in model 'a' but [52, 32] in model 'n'", "differ in width"]),
    ('[{ model = "a", range = [4, 2] }]', ["layers entry 1: range [4, 2] is reversed"]),
    ('[{ model = "a", range = [0, 9] }]', ["range [0, 9] is out of range: the model has 8 layers"]),
    ('[{ model = "a", range = [0, 2] }, { model = "a", range = [3, 3] }, { model = "a", range = [3, 5] }]',
     ["entry 2: an empty range contributes nothing"]),
    ('[{ model = "x", range = [0, 2] }]', ["entry 1 model: no model named 'x'"]),
    ('[{ model = "a", rnage = [0, 2] }]', ["unknown key 'rnage' (did you mean 'range'?)"]),
    ('[{ model = "a", range = [0, 2], layers = [1] }]', ["give exactly one of range"]),
    ('[{ model = "a", layers = ["1:"], scale = "x" }]', ["parameter 'scale' must be a number"]),
    ("[]", ["[method] layers is empty"]),
])
def test_bad_frankenmerges_fail_with_one_line(tmp_path, llama8, narrow, layers, fragments):
    n = f'n = "{narrow}"' if '"n"' in layers else ""
    project = write_project(tmp_path, f"""
[models]
a = "{llama8['ft1']}"
{n}
[method]
name = "frankenmerge"
layers = {layers}
[output]
path = "out"
""")
    fails(project, *fragments)


def _qwen2(folder, window_layers):
    cfg = transformers.Qwen2Config(vocab_size=52, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                                   num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True,
                                   sliding_window=8, max_window_layers=window_layers)
    torch.manual_seed(4)
    return tiny_models.save(transformers.Qwen2ForCausalLM(cfg), folder)


def test_layer_threshold_fields_are_recomputed_or_refused(tmp_path):
    source = _qwen2(tmp_path / "qwen", 3)
    out = upscale(tmp_path, source, '["0:3", "0:3", "3:6"]')
    config = json.loads((out / "config.json").read_text())
    assert config["max_window_layers"] == 6 and config["num_hidden_layers"] == 9
    assert config["layer_types"] == ["full_attention"] * 6 + ["sliding_attention"] * 3
    assert transformers.AutoConfig.from_pretrained(out).layer_types == config["layer_types"]
    project = write_project(tmp_path, f"""
[models]
m = "{source}"
[method]
name = "depth_upscaling"
layers = ["0:4", "2:6"]
[output]
path = "out"
""", "bad.toml")
    (tmp_path / "out").rename(tmp_path / "kept")
    fails(project, "config.json field 'max_window_layers'", "cannot be recomputed")
    periodic = {"num_hidden_layers": 4, "sliding_window_pattern": 2, "mlp_only_layers": [1, 3],
                "text_config": {"num_hidden_layers": 4, "layer_types": list("abcd")}}
    mapped = map_config({"m": periodic}, "m", [("m", 0), ("m", 1), ("m", 0), ("m", 1)], "x")
    assert mapped["mlp_only_layers"] == [1, 3] and mapped["text_config"]["layer_types"] == list("abab")
    with pytest.raises(MixcliError, match="field 'sliding_window_pattern'"):
        map_config({"m": periodic}, "m", [("m", 0), ("m", 0), ("m", 1)], "x")


# ---------------------------------------------------------------- model recombination

def recombination(tmp_path, family, seed, granularity="layer", out="out", extra="", names=("base", "ft1", "ft2")):
    models = "\n".join(f'{name} = "{family[name]}"' for name in names)
    return write_project(tmp_path, f"""
[models]
{models}
[method]
name = "model_recombination"
granularity = "{granularity}"
seed = {seed}
{extra}
[output]
path = "{out}"
""", f"{out}.toml")


@pytest.mark.parametrize("granularity", ["layer", "sublayer", "tensor"])
def test_recombination_is_a_permutation_for_every_seed(tmp_path, llama_family, granularity):
    tables = set()
    for seed in range(20):
        plans = prepare(recombination(tmp_path, llama_family, seed, granularity)).plans
        assert list(plans) == ["model_0", "model_1", "model_2"]
        sources = {}
        for plan in plans.values():
            for tensor in plan.tensors:
                sources.setdefault(tensor.name, []).append(tensor.reads[0][0].name)
        assert all(sorted(s) == ["base", "ft1", "ft2"] for s in sources.values())
        if granularity != "tensor":  # slot consistency: a whole block (or sub-block) from one input
            for plan in plans.values():
                by_slot = {}
                for tensor in plan.tensors:
                    by_slot.setdefault(tensor.details["slot"], set()).add(tensor.reads[0][0].name)
                assert all(len(s) == 1 for s in by_slot.values())
                assert len(by_slot) == (2 + 4 if granularity == "layer" else 2 + 4 * 4)
        tables.add(tuple(sorted((n, tuple(s)) for n, s in sources.items())))
    assert len(tables) >= 2


def test_recombination_outputs_are_the_inputs_reshuffled(tmp_path, llama_family):
    merge(recombination(tmp_path, llama_family, 3, "sublayer"))
    inputs = {n: tiny_models.load_tensors(llama_family[n]) for n in ("base", "ft1", "ft2")}
    outputs = [tiny_models.load_tensors(tmp_path / "out" / f"model_{j}") for j in range(3)]
    for name in inputs["base"]:
        want = Counter(inputs[n][name].numpy().tobytes() for n in inputs)
        assert Counter(o[name].numpy().tobytes() for o in outputs) == want  # bitwise multiset
    for j in range(3):
        meta = json.loads((tmp_path / "out" / f"model_{j}" / "recombination.json").read_text())
        assert meta["seed"] == 3 and meta["models"] == ["base", "ft1", "ft2"] and meta["output"] == j
        for slot in meta["slots"]:  # the recorded table reproduces the output
            source = inputs[meta["models"][slot["sources"][j]]]
            assert slot["source"] == meta["models"][slot["sources"][j]]
            assert all(torch.equal(outputs[j][t], source[t]) for t in slot["tensors"])
        assert torch.isfinite(tiny_models.logits(tmp_path / "out" / f"model_{j}")).all()
    merge(recombination(tmp_path, llama_family, 3, "sublayer", out="again"))
    again = [tiny_models.load_tensors(tmp_path / "again" / f"model_{j}") for j in range(3)]
    assert all(torch.equal(outputs[j][k], again[j][k]) for j in range(3) for k in outputs[j])
    merge(recombination(tmp_path, llama_family, 4, "sublayer", out="other"))
    other = [tiny_models.load_tensors(tmp_path / "other" / f"model_{j}") for j in range(3)]
    assert any(not torch.equal(outputs[j][k], other[j][k]) for j in range(3) for k in outputs[j])


def test_recombination_single_output_tied_models_and_errors(tmp_path, tied_family, llama_family, narrow):
    merge(recombination(tmp_path, tied_family, 1, "tensor", extra="num_outputs = 1"))
    assert not (tmp_path / "out" / "model_0").exists()
    out = tiny_models.load_tensors(tmp_path / "out")
    assert "lm_head.weight" not in out
    assert torch.isfinite(tiny_models.logits(tmp_path / "out")).all()
    (tmp_path / "out").rename(tmp_path / "tied_out")
    fails(recombination(tmp_path, llama_family, 0, extra="num_outputs = 4"), "num_outputs is 4 but there are only 3")
    fails(recombination(tmp_path, llama_family, 0, granularity="block"), "must be one of 'layer'")
    family = dict(llama_family, narrow=narrow)
    fails(recombination(tmp_path, family, 0, names=("base", "narrow")),
          "recombination needs models with identical shapes")


@pytest.mark.parametrize("method", ["frankenmerge", "depth_upscaling", "model_recombination"])
def test_method_dtype_is_the_dtype_of_every_floating_tensor_written(method, tmp_path, llama_family):
    # the recipe says float16: a layer map that copied float32 tensors would write another model
    if method == "frankenmerge":
        body = ('[method]\nname = "frankenmerge"\ndtype = "float16"\nlayers = [{ model = "base", range = [0, 2] }, '
                '{ model = "ft1", range = [1, 3] }]\n')
        models = f'[models]\nbase = "{llama_family["base"]}"\nft1 = "{llama_family["ft1"]}"\n'
    elif method == "model_recombination":
        body = '[method]\nname = "model_recombination"\ndtype = "float16"\nnum_outputs = 1\n'
        models = f'[models]\nbase = "{llama_family["base"]}"\nft1 = "{llama_family["ft1"]}"\n'
    else:
        body = '[method]\nname = "depth_upscaling"\ndtype = "float16"\nlayers = ["0:2", "1:3"]\n'
        models = f'[models]\nbase = "{llama_family["base"]}"\n'
    project = tmp_path / "project.toml"
    project.write_text(models + body + f'[output]\npath = "{tmp_path / "out"}"\n')
    result = CliRunner().invoke(cli, ["merge", str(project), "--no-progress"])
    assert result.exit_code == 0, result.output
    written = tiny_models.load_tensors(tmp_path / "out")
    base = tiny_models.load_tensors(llama_family["base"])
    assert written and all(t.dtype == torch.float16 for t in written.values())
    name = "model.layers.0.mlp.up_proj.weight"
    sources = [base] + ([tiny_models.load_tensors(llama_family["ft1"])] if method == "model_recombination" else [])
    assert any(torch.equal(written[name], source[name].half()) for source in sources)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "float16"
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.dtype == torch.float16
