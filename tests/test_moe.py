"""MoE mixing (mixcli-moe): upcycling, merging, router initialisation, attention experts,
router tuning (one process and two gloo processes), on tiny seeded models through the CLI."""

import functools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tomli
import torch
import transformers
from click.testing import CliRunner

import tiny_models
from conftest import write_project
from mixcli import MixcliError
from mixcli.cli import cli
from mixcli.plugins import register_architectures
from mixcli_moe._balance import balance_loss, reference_balance_loss

register_architectures()
PROMPTS = {"ft1": ["12+34=", "5*5=7"], "ft2": ["abc:cba", "xyz:"], "ft3": ["hello world", "the end."]}


def toml(value):
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)


def run(*args):
    result = CliRunner().invoke(cli, [*map(str, args)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def fails(project, message):
    result = CliRunner().invoke(cli, ["merge", str(project)])
    assert result.exit_code == 1, result.output
    assert result.output.strip() == f"Error: {message}", result.output
    assert not (project.parent / "out").exists()


def upcycle(tmp_path, model, **params):
    lines = "\n".join(f"{k} = {toml(v)}" for k, v in params.items())
    project = write_project(tmp_path, f'[models]\ndense = "{model}"\n[method]\nname = "moe_upcycle"\n{lines}\n'
                                      '[output]\npath = "out"\n')
    run("merge", project)
    return tmp_path / "out"


def merge_project(tmp_path, family, experts=("ft1", "ft2", "ft3"), prompts=True, tune="", **params):
    models = [f'base = "{family["base"]}"']
    for name in experts:
        extra = f', positive_prompts = {json.dumps(PROMPTS[name])}' if prompts else ""
        models.append(f'{name} = {{ path = "{family[name]}"{extra} }}')
    lines = "\n".join(f"{k} = {toml(v)}" for k, v in params.items())
    return write_project(tmp_path, "[models]\n" + "\n".join(models) + '\n[method]\nname = "moe_merge"\n'
                         f'base = "base"\n{lines}\n[output]\npath = "out"\n{tune}')


def generate(folder, ids=None):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = tiny_models.tokenizer()("12+34=5", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    return out[0].tolist()


# ---------------------------------------------------------------- upcycling: dense equivalence

@pytest.mark.parametrize("arch, modules, experts, k", [
    ("llama", ["mlp"], 4, 2), ("mistral", ["mlp"], 3, 3),
    ("llama", ["mlp", "q_proj", "k_proj", "v_proj"], 4, 1), ("mistral", ["k_proj"], 2, 2),
    ("llama", ["mlp", "o_proj"], 4, 2)])
def test_upcycled_model_reproduces_the_dense_model(tmp_path, llama_family, mistral_family, arch, modules,
                                                   experts, k):
    family = llama_family if arch == "llama" else mistral_family
    out = upcycle(tmp_path, family["base"], num_experts=experts, experts_per_token=k, gate_mode="random",
                  modules=modules)
    config = json.loads((out / "config.json").read_text())
    assert config["num_local_experts"] == experts and config["num_experts_per_tok"] == k
    assert config["sliding_window"] is None
    assert config["architectures"] == (["MixtralForCausalLM"] if modules == ["mlp"] else ["MixLlamaForCausalLM"])
    assert (tiny_models.logits(out) - tiny_models.logits(family["base"])).abs().max() <= 1e-4
    assert generate(out) == generate(family["base"])
    dense, moe = tiny_models.load_tensors(family["base"]), tiny_models.load_tensors(out)
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.self_attn.o_proj.weight",
                 "model.layers.2.input_layernorm.weight", "model.norm.weight"):
        routed = name.replace(".o_proj.", ".o_proj.experts.3.") if "o_proj" in modules else name
        assert torch.equal(moe[routed], dense[name])
    assert all(torch.isfinite(t).all() for t in moe.values())


def test_v4_layout_loads_in_transformers_5_and_matches(tmp_path, llama_family):
    out = upcycle(tmp_path, llama_family["base"], num_experts=2, layout="v4", noise_scale=0.0)
    names = tiny_models.load_tensors(out)
    assert "model.layers.0.block_sparse_moe.experts.1.w3.weight" in names
    assert "model.layers.0.block_sparse_moe.gate.weight" in names
    assert (tiny_models.logits(out) - tiny_models.logits(llama_family["base"])).abs().max() <= 1e-4


# ---------------------------------------------------------------- merging: tensors placed exactly

@pytest.mark.parametrize("layout", ["v5", "v4"])
def test_merge_places_every_expert_and_copies_the_stem(tmp_path, llama_family, layout):
    project = merge_project(tmp_path, llama_family, gate_mode="uniform_random", layout=layout, experts_per_token=1)
    run("merge", project)
    out = tiny_models.load_tensors(tmp_path / "out")
    base = tiny_models.load_tensors(llama_family["base"])
    sources = [tiny_models.load_tensors(llama_family[n]) for n in ("ft1", "ft2", "ft3")]
    for layer in range(4):
        for e, src in enumerate(sources):
            gate, up, down = (src[f"model.layers.{layer}.mlp.{p}_proj.weight"] for p in ("gate", "up", "down"))
            if layout == "v5":
                fused = out[f"model.layers.{layer}.mlp.experts.gate_up_proj"][e]
                assert torch.equal(fused[:160], gate) and torch.equal(fused[160:], up)
                assert torch.equal(out[f"model.layers.{layer}.mlp.experts.down_proj"][e], down)
            else:
                prefix = f"model.layers.{layer}.block_sparse_moe.experts.{e}."
                assert torch.equal(out[prefix + "w1.weight"], gate) and torch.equal(out[prefix + "w3.weight"], up)
                assert torch.equal(out[prefix + "w2.weight"], down)
    for name, tensor in base.items():
        if ".mlp." not in name:
            assert torch.equal(out[name], tensor), name
    info = json.loads((tmp_path / "out" / "moe_info.json").read_text())
    counts = info["parameters"]
    assert counts["total"] == counts["stem"] + counts["experts"] + counts["routers"]
    assert counts["routers"] == 4 * 3 * 64 and counts["active"] == counts["stem"] + counts["routers"] + counts["experts"] // 3


def test_block_routing_k1_picks_the_source_mlp(tmp_path, llama_family):
    """k = 1: each token's MoE output is the MLP of the expert the router picks."""
    project = merge_project(tmp_path, llama_family, gate_mode="random", experts_per_token=1)
    run("merge", project)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    block = model.model.layers[1].mlp
    h = torch.randn(7, 64)
    chosen = (h @ block.gate.weight.T).argmax(-1)
    with torch.no_grad():
        y = block(h[None])[0]
    for t in range(7):
        src = tiny_models.load_tensors(llama_family[("ft1", "ft2", "ft3")[chosen[t]]])
        g, u, d = (src[f"model.layers.1.mlp.{p}_proj.weight"] for p in ("gate", "up", "down"))
        want = d @ (torch.nn.functional.silu(g @ h[t]) * (u @ h[t]))
        assert torch.allclose(y[t], want, atol=1e-5)


def test_stem_average_and_task_arithmetic(tmp_path, llama_family):
    name = "model.layers.0.self_attn.o_proj.weight"
    ft = [tiny_models.load_tensors(llama_family[n])[name] for n in ("ft1", "ft2", "ft3")]
    base = tiny_models.load_tensors(llama_family["base"])[name]
    run("merge", merge_project(tmp_path, llama_family, gate_mode="uniform_random", stem="average"))
    assert torch.allclose(tiny_models.load_tensors(tmp_path / "out")[name], sum(ft) / 3, atol=1e-6)
    (tmp_path / "ta").mkdir()
    run("merge", merge_project(tmp_path / "ta", llama_family, gate_mode="uniform_random", stem="task_arithmetic",
                               stem_params={"lambda": 0.5}))
    want = base + 0.5 * sum(t - base for t in ft)
    assert torch.allclose(tiny_models.load_tensors(tmp_path / "ta" / "out")[name], want, atol=1e-5)


def test_stem_head_merges_tied_and_untied_models_in_either_role(tmp_path, llama_family, tied_family):
    untied, tied = tiny_models.load_tensors(llama_family["ft2"]), tiny_models.load_tensors(tied_family["ft1"])
    want = (tied["model.embed_tokens.weight"] + untied["lm_head.weight"]) / 2
    for base in (llama_family["base"], tied_family["base"]):  # an untied, then a tied base
        folder = tmp_path / base.parent.name
        folder.mkdir()
        project = write_project(folder, f"""
[models]
base = "{base}"
t = "{tied_family['ft1']}"
u = "{llama_family['ft2']}"
[method]
name = "moe_merge"
base = "base"
experts = ["t", "u"]
gate_mode = "uniform_random"
stem = "average"
[output]
path = "out"
""")
        run("merge", project)
        out = tiny_models.load_tensors(folder / "out")
        assert torch.allclose(out["lm_head.weight"], want, atol=1e-7)
        assert json.loads((folder / "out" / "config.json").read_text())["tie_word_embeddings"] is False
        model = transformers.AutoModelForCausalLM.from_pretrained(folder / "out")
        assert torch.equal(model.lm_head.weight.detach(), out["lm_head.weight"])


# ---------------------------------------------------------------- router initialisation

def test_random_and_uniform_routers_match_the_seeded_draws(tmp_path, llama_family):
    torch.manual_seed(0)
    want = torch.randn(4, 4, 64)  # mergekit: manual_seed, then the first draw
    out = upcycle(tmp_path, llama_family["base"], num_experts=4, gate_mode="random", scale=1.0)
    routers = tiny_models.load_tensors(out)
    for layer in range(4):
        assert torch.equal(routers[f"model.layers.{layer}.mlp.gate.weight"], want[layer])
    (tmp_path / "small").mkdir()  # the default scale: 0.02 times the same draw (N(0, 0.02^2))
    out = upcycle(tmp_path / "small", llama_family["base"], num_experts=4, gate_mode="random")
    values = torch.stack([tiny_models.load_tensors(out)[f"model.layers.{i}.mlp.gate.weight"] for i in range(4)])
    assert torch.equal(values, want * 0.02)
    assert abs(float(values.std()) - 0.02) < 0.002
    (tmp_path / "u").mkdir()
    out = upcycle(tmp_path / "u", llama_family["base"], num_experts=4, gate_mode="uniform_random")
    values = torch.stack([tiny_models.load_tensors(out)[f"model.layers.{i}.mlp.gate.weight"] for i in range(4)])
    assert values.abs().max() <= 64 ** -0.5 and values.std() > 0.05


@functools.lru_cache(maxsize=2)
def _eager_model(folder, dtype):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="eager").eval()


def _independent_prompt_states(folder, prompts, average, dtype, source="residual"):
    """Mean over prompts of a router's input, one prompt at a time (no padding at all): the
    residual stream entering each layer, or what each router reads (``attn_input`` =
    input_layernorm of it; ``mlp_input`` = post_attention_layernorm of it plus the attention
    output, the attention rebuilt by hand from eager attention probabilities and v_proj)."""
    model = _eager_model(folder, dtype)
    cfg = model.config
    rows = []
    for prompt in prompts:
        ids = torch.tensor([[1] + tiny_models.tokenizer()(prompt, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            out = model(input_ids=ids, output_hidden_states=True, output_attentions=True)
            per_layer = []
            for index, (layer, probs) in enumerate(zip(model.model.layers, out.attentions)):
                state = out.hidden_states[index][0].float()
                if source != "residual":
                    normed = layer.input_layernorm(state)
                    state = normed
                    if source == "mlp_input":
                        values = layer.self_attn.v_proj(normed).view(-1, cfg.num_key_value_heads, cfg.head_dim)
                        values = values.transpose(0, 1).repeat_interleave(
                            cfg.num_attention_heads // cfg.num_key_value_heads, dim=0)
                        mixed = (probs[0] @ values).transpose(0, 1).reshape(ids.shape[1], -1)
                        middle = out.hidden_states[index][0].float() + layer.self_attn.o_proj(mixed)
                        state = layer.post_attention_layernorm(middle)
                per_layer.append(state.mean(0) if average else state[-1])
        rows.append(torch.stack(per_layer))
    return torch.stack(rows).mean(0)


@pytest.mark.parametrize("mode, source", [("hidden", "residual"), ("hidden_avg", "residual"), ("cheap_embed", ""),
                                          ("hidden", "router_input"), ("hidden_avg", "router_input")])
def test_prompt_routers_match_an_independent_computation(tmp_path, llama_family, mode, source):
    # router_input: MLP routers from the MLP input, q_proj routers from the attention input
    negative = {"ft2": ["1+1="]}
    extra = {"hidden_source": source, "modules": ["mlp", "q_proj"]} if source else {}
    project = merge_project(tmp_path, llama_family, gate_mode=mode, hidden_dtype="float32", **extra)
    text = project.read_text().replace('positive_prompts = ["abc:cba", "xyz:"]',
                                       'positive_prompts = ["abc:cba", "xyz:"], negative_prompts = ["1+1="]')
    project.write_text(text)
    run("merge", project)
    out = tiny_models.load_tensors(tmp_path / "out")
    embed = tiny_models.load_tensors(llama_family["base"])["model.embed_tokens.weight"]
    routers = {"mlp": "model.layers.{}.mlp.gate.weight", "q_proj": "model.layers.{}.self_attn.q_proj.router.weight"}
    places = {"mlp": "mlp_input", "q_proj": "attn_input"} if source == "router_input" else \
        {"mlp": "residual", "q_proj": "residual"}
    for group in ("mlp", "q_proj") if source else ("mlp",):
        for e, name in enumerate(("ft1", "ft2", "ft3")):
            if mode == "cheap_embed":
                def unit(prompts):
                    total = torch.zeros(64)
                    for p in prompts:
                        ids = [1] + tiny_models.tokenizer()(p, add_special_tokens=False)["input_ids"]
                        total += embed[ids].sum(0)
                    return total / total.norm()
                vector = unit(PROMPTS[name]) - (unit(negative[name]) if name in negative else 0)
                want = (vector / vector.norm())[None].repeat(4, 1)
            else:
                average = mode == "hidden_avg"
                vector = _independent_prompt_states(llama_family["base"], PROMPTS[name], average, torch.float32,
                                                    places[group])
                if name in negative:
                    vector = vector - _independent_prompt_states(llama_family["base"], negative[name], average,
                                                                 torch.float32, places[group])
                want = vector / vector.norm(dim=-1, keepdim=True)
            got = torch.stack([out[routers[group].format(layer)][e] for layer in range(4)])
            assert torch.allclose(got, want, atol=1e-5), (mode, group, name, (got - want).abs().max())
            assert torch.allclose(got.norm(dim=-1), torch.ones(4), atol=1e-5)


def test_a_degenerate_layer_takes_the_mean_over_tokens_and_says_so(tmp_path, llama_family):
    # every prompt ends in "=": the residual stream entering layer 0 at the last token is the
    # embedding of "=" for every expert, so that layer's last-token rows are identical
    prompts = {"ft1": ["12+34=", "5*5="], "ft2": ["abc=", "xyz="], "ft3": ["hello=", "the end="]}
    project = merge_project(tmp_path, llama_family, prompts=False, gate_mode="hidden", hidden_dtype="float32",
                            hidden_source="residual")
    text = project.read_text()
    for name, own in prompts.items():
        text = text.replace(f'{name} = {{ path = "{llama_family[name]}" }}',
                            f'{name} = {{ path = "{llama_family[name]}", positive_prompts = {json.dumps(own)} }}')
    project.write_text(text)
    result = run("merge", project)
    assert ("warning: project.toml: [method]: residual router rows of layers [0] were near-identical at the last "
            "token (condition number ") in " ".join(result.output.split())
    assert ("every prompt ends in the token '=', whose state there is the same for every expert); those layers "
            "use the mean over all prompt tokens instead (as gate_mode = \"hidden_avg\")") in " ".join(result.output.split())
    out = tiny_models.load_tensors(tmp_path / "out")
    for e, name in enumerate(("ft1", "ft2", "ft3")):
        last = _independent_prompt_states(llama_family["base"], prompts[name], False, torch.float32)
        mean = _independent_prompt_states(llama_family["base"], prompts[name], True, torch.float32)
        want = torch.cat([mean[:1], last[1:]])
        want = want / want.norm(dim=-1, keepdim=True)
        got = torch.stack([out[f"model.layers.{layer}.mlp.gate.weight"][e] for layer in range(4)])
        assert torch.allclose(got, want, atol=1e-5), (name, (got - want).abs().max())
    rows = torch.stack([out[f"model.layers.0.mlp.gate.weight"][e] for e in range(3)])
    assert float(torch.linalg.cond(rows)) < 1e3


def _independent_o_proj_inputs(folder, prompts, average):
    """What enters o_proj, rebuilt from eager attention probabilities and v_proj by hand."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    cfg = model.config
    rows = []
    for prompt in prompts:
        ids = torch.tensor([[1] + tiny_models.tokenizer()(prompt, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            out = model(input_ids=ids, output_hidden_states=True, output_attentions=True)
            per_layer = []
            for layer, probs in zip(model.model.layers, out.attentions):
                state = out.hidden_states[len(per_layer)]
                values = layer.self_attn.v_proj(layer.input_layernorm(state))  # [1, T, kv * d]
                values = values.view(1, -1, cfg.num_key_value_heads, cfg.head_dim).transpose(1, 2)
                values = values.repeat_interleave(cfg.num_attention_heads // cfg.num_key_value_heads, dim=1)
                mixed = (probs @ values).transpose(1, 2).reshape(ids.shape[1], -1)  # [T, heads * d]
                per_layer.append(mixed.mean(0) if average else mixed[-1])
        rows.append(torch.stack(per_layer))
    return torch.stack(rows).mean(0)


@pytest.mark.parametrize("mode", ["hidden", "hidden_avg"])
def test_o_proj_routers_read_the_attention_output(tmp_path, llama_family, mode):
    project = merge_project(tmp_path, llama_family, gate_mode=mode, hidden_dtype="float32", modules=["o_proj"])
    run("merge", project)
    out = tiny_models.load_tensors(tmp_path / "out")
    for e, name in enumerate(("ft1", "ft2", "ft3")):
        vector = _independent_o_proj_inputs(llama_family["base"], PROMPTS[name], mode == "hidden_avg")
        want = vector / vector.norm(dim=-1, keepdim=True)
        got = torch.stack([out[f"model.layers.{layer}.self_attn.o_proj.router.weight"][e] for layer in range(4)])
        assert torch.allclose(got, want, atol=1e-5), (mode, name, (got - want).abs().max())


def test_o_proj_routers_take_the_attention_width_when_it_differs_from_hidden(tmp_path):
    cfg = tiny_models.config("llama", 2)
    cfg.head_dim = 8  # 4 heads x 8 = 32 wide attention output, hidden 64
    torch.manual_seed(5)
    narrow = tiny_models.save(transformers.LlamaForCausalLM(cfg), tmp_path / "narrow")
    (tmp_path / "up").mkdir()
    out = upcycle(tmp_path / "up", narrow, num_experts=2, gate_mode="uniform_random", modules=["mlp", "o_proj"])
    tensors = tiny_models.load_tensors(out)
    assert tensors["model.layers.1.self_attn.o_proj.router.weight"].shape == (2, 32)
    assert tensors["model.layers.1.self_attn.o_proj.router.weight"].abs().max() <= 32 ** -0.5
    assert (tiny_models.logits(out) - tiny_models.logits(narrow)).abs().max() <= 1e-4
    family = {"base": narrow, "ft1": narrow, "ft2": narrow}
    run("merge", merge_project(tmp_path, family, experts=("ft1", "ft2"), gate_mode="hidden",
                               hidden_dtype="float32", modules=["o_proj"]))
    routers = tiny_models.load_tensors(tmp_path / "out")["model.layers.0.self_attn.o_proj.router.weight"]
    assert routers.shape == (2, 32) and torch.allclose(routers.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert (tiny_models.logits(tmp_path / "out") - tiny_models.logits(narrow)).abs().max() <= 1e-4


# ---------------------------------------------------------------- attention-projection experts

@pytest.mark.parametrize("proj", ["q_proj", "k_proj", "v_proj", "o_proj"])
def test_each_attention_projection_is_mixed_and_used(tmp_path, llama_family, proj):
    run("merge", merge_project(tmp_path, llama_family, gate_mode="hidden", modules=[proj], layers=[1, 2]))
    out = tmp_path / "out"
    tensors = tiny_models.load_tensors(out)
    ft2 = tiny_models.load_tensors(llama_family["ft2"])
    assert torch.equal(tensors[f"model.layers.1.self_attn.{proj}.experts.1.weight"], ft2[f"model.layers.1.self_attn.{proj}.weight"])
    assert tensors[f"model.layers.2.self_attn.{proj}.router.weight"].shape == (3, 64)
    assert f"model.layers.0.self_attn.{proj}.weight" in tensors  # layer 0 not mixed: dense
    assert "model.layers.0.mlp.gate_proj.weight" in tensors  # MLP not mixed: dense
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "mixcli_mixllama" and config["moe_layer_idx"] == [1, 2] and not config["moe_mlp"]
    before = tiny_models.logits(out)
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():  # change every expert of one projection: the output must change
        for expert in getattr(model.model.layers[1].self_attn, proj).experts:
            expert.weight.mul_(3.0)
        ids = tiny_models.tokenizer()("12+34=", return_tensors="pt")
        after = model(**ids).logits
    assert (after - before).abs().max() > 1e-3
    assert len(generate(out)) == 8 + 12


# ---------------------------------------------------------------- router tuning

TUNE = """
[tune]
data = "{data}"
steps = 4
batch_size = 4
lr = 0.01
eval_fraction = 0.2
seed = 3
"""


def tune_data(folder: Path) -> Path:
    rows = [{"prompt": p, "answer": a} for p, a in [("12+34=", "46"), ("abc:", "cba"), ("5*5=", "25"),
            ("hello ", "world"), ("9-3=", "6"), ("xyz:", "zyx"), ("7+1=", "8"), ("dog:", "god"),
            ("1+1=", "2"), ("cat:", "tac")]]
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, llama_family):
    folder = tmp_path_factory.mktemp("tune")
    project = merge_project(folder, llama_family, gate_mode="hidden", modules=["mlp", "q_proj"],
                            tune=TUNE.format(data=tune_data(folder)))
    run("merge", project)
    (folder / "one.out").write_text(run("tune", project, "--out", folder / "one").output)
    return folder, project


def test_tuning_changes_only_the_routers(tuned):
    folder, _ = tuned
    before, after = tiny_models.load_tensors(folder / "out"), tiny_models.load_tensors(folder / "one")
    assert before.keys() == after.keys()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == {n for n in before if n.endswith((".mlp.gate.weight", ".router.weight"))}
    log = json.loads((folder / "one" / "tune_log.json").read_text())
    assert log["trainable_parameters"] == (4 + 4) * 3 * 64  # (MLP + q routers) * E * H
    assert len(log["history"]) == 4 and log["before"]["load"]["mlp"][0]
    assert (f"(held-out CE {log['before']['ce']:.4f} -> {log['after']['ce']:.4f}, "
            f"aux {log['before']['aux']:.4f} -> {log['after']['aux']:.4f})") in (folder / "one.out").read_text()
    assert (folder / "one" / "tune_loss.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((folder / "one" / "config.json").read_text())["router_aux_loss_coef"] == 0.01
    assert len(generate(folder / "one")) == 20


def test_top1_routing_warns_that_routers_get_no_gradient(tmp_path, llama_family):
    project = merge_project(tmp_path, llama_family, gate_mode="random", experts_per_token=1,
                            tune=TUNE.format(data=tune_data(tmp_path)).replace("steps = 4", "steps = 1"))
    run("merge", project)
    result = run("tune", project, "--no-progress")
    assert ("warning: project.toml: [tune]: the model routes each token to 1 expert, whose renormalised weight is "
            "always 1") in " ".join(result.output.split())


def test_two_gloo_processes_match_one(tuned):
    folder, project = tuned
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "mixcli", "tune", str(project), "--out", str(folder / "two"), "--no-progress"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=folder, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = tiny_models.load_tensors(folder / "one"), tiny_models.load_tensors(folder / "two")
    routers = [n for n in one if n.endswith((".gate.weight", ".router.weight"))]
    assert routers and all(torch.allclose(one[n], two[n], atol=1e-5) for n in routers)
    assert not torch.equal(one[routers[0]], tiny_models.load_tensors(folder / "out")[routers[0]])
    assert json.loads((folder / "two" / "tune_log.json").read_text())["world_size"] == 2


def test_answer_only_loss_counts_answer_tokens_only(tuned):
    # One step whose batch is every row (order does not matter then): the logged CE must equal
    # the mean CE over answer tokens (and EOS) computed here with stock transformers.
    folder, _ = tuned
    data = folder / "train.jsonl"
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    tune = f'[tune]\ndata = "{data}"\nsteps = 1\nbatch_size = {len(rows)}\nlr = 0.01\neval_fraction = 0.0\n' \
           'answer_only = true\n'
    project = write_project(folder, (folder / "project.toml").read_text().split("[tune]")[0] + tune, "answer.toml")
    result = run("tune", project, "--model", folder / "out", "--out", folder / "answer")
    history = json.loads((folder / "answer" / "tune_log.json").read_text())["history"]
    logged = history[0]["ce"]
    # nothing held out: the message says its CE figures are the first and last training batch's
    assert (f"(CE of the first -> last training batch {history[0]['ce']:.4f} -> {history[-1]['ce']:.4f}, "
            f"aux {history[0]['aux']:.4f} -> {history[-1]['aux']:.4f}; nothing held out (eval_fraction = 0))") \
        in " ".join(result.output.split())
    tok = transformers.AutoTokenizer.from_pretrained(folder / "out")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder / "out").eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            ids = tok(row["prompt"] + row["answer"] + tok.eos_token, return_tensors="pt")["input_ids"]
            start = len(tok(row["prompt"])["input_ids"])
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
            for j in range(start, ids.shape[1]):
                total -= float(logp[j - 1, ids[0, j]])
                count += 1
    assert logged == pytest.approx(total / count, abs=1e-4)
    text_only = folder / "text.jsonl"
    text_only.write_text("".join(json.dumps({"text": r["prompt"] + r["answer"]}) + "\n" for r in rows))
    project.write_text(project.read_text().replace(str(data), str(text_only)))
    result = CliRunner().invoke(cli, ["tune", str(project), "--model", str(folder / "out"), "--out",
                                      str(folder / "never")])
    assert result.exit_code == 1 and not (folder / "never").exists()
    assert result.output.strip() == f"Error: [tune] data: {text_only} has no 'prompt' + 'answer' columns, which " \
                                    "answer_only = true needs (columns: text)"


def test_balance_loss_matches_transformers():
    torch.manual_seed(0)
    logits = [torch.randn(10, 4) for _ in range(3)]
    mask = torch.ones(10)
    assert torch.allclose(balance_loss(logits, mask, 2), reference_balance_loss(logits, 2), atol=1e-6)
    assert float(balance_loss([torch.zeros(8, 4)], torch.ones(8), 2)) == pytest.approx(2.0)


# ---------------------------------------------------------------- mistakes: one line, before any read

def test_random_routers_need_a_positive_scale(tmp_path, llama_family):
    # scale = 0 would give all-zero routers: every expert equally weighted, nothing to break the tie
    project = merge_project(tmp_path, llama_family, experts=("ft1", "ft2"), gate_mode="random", scale=0.0)
    fails(project, "project.toml: [method]: parameter 'scale' must be > 0.0, got 0.0")
    project = write_project(tmp_path, f'[models]\ndense = "{llama_family["base"]}"\n[method]\nname = "moe_upcycle"\n'
                                      'gate_mode = "random"\nscale = 0.0\n[output]\npath = "out"\n', "up.toml")
    fails(project, "up.toml: [method]: parameter 'scale' must be > 0.0, got 0.0")


def test_bad_inputs_give_one_line_errors(tmp_path, llama_family):
    project = merge_project(tmp_path, llama_family, experts=("ft1", "ft2"), gate_mode="random", experts_per_token=3)
    fails(project, "project.toml: [method]: experts_per_token (3) is larger than the number of experts (2)")
    project = merge_project(tmp_path, llama_family, experts=("ft1", "ft2"), prompts=False)
    fails(project, "project.toml: [models.ft1]: expert 'ft1' has no positive_prompts; gate_mode 'hidden' needs prompts for "
                   "every expert (positive_prompts = [...] or prompts_file = \"...\")")
    project = merge_project(tmp_path, llama_family, experts=("ft1",), gate_mode="random", modules=["mlp", "out_proj"])
    fails(project, "project.toml: [method]: modules must be a non-empty subset of mlp, q_proj, k_proj, v_proj, "
                   "o_proj; 'out_proj' is not one of them")
    project = merge_project(tmp_path, llama_family, experts=("ft1", "ft2"), gate_mode="cheap_embed",
                            modules=["mlp", "o_proj"])
    fails(project, "project.toml: [method]: gate_mode 'cheap_embed' cannot initialise o_proj routers (o_proj reads "
                   "the attention output, not token embeddings); use 'hidden' or 'random'")
    cfg = tiny_models.config("llama", 4)
    cfg.hidden_size, cfg.intermediate_size = 32, 80
    torch.manual_seed(9)
    tiny_models.save(transformers.LlamaForCausalLM(cfg), tmp_path / "narrow")
    project = merge_project(tmp_path, {**llama_family, "ft2": tmp_path / "narrow"}, experts=("ft1", "ft2"),
                            gate_mode="random")
    fails(project, "project.toml: [method]: experts of different shapes: 'lm_head.weight' is [52, 32] in 'ft2' "
                   "and [52, 64] in the base 'base'; all models must share one architecture and size")


def test_missing_plugin_is_named(tmp_path):
    from mixcli.evaluation import check_architecture

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mixcli_not_installed",
                                                      "mixcli_plugin": "mixcli-moe"}))
    with pytest.raises(MixcliError, match=r"install it \(pip install mixcli-moe\)"):
        check_architecture(tmp_path)


def test_importing_the_plugin_does_not_import_torch():
    code = "import sys, mixcli_moe; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_tuned_model_has_a_card_and_eval_of_the_project_follows_the_tuned_output(tuned):
    folder, project = tuned
    card = (folder / "one" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers") and "# one\n" in card
    assert "trained by `mixcli tune`" in card and 'name = "moe_merge"' in card
    recipe = tomli.loads((folder / "one" / "mixcli.toml").read_text())
    assert recipe["output"]["path"] == "." and recipe["models"] == tomli.loads(project.read_text())["models"]
    (folder / "eval.txt").write_text("12+34=46\nabc:cba\nhello world\n")
    text = project.read_text().rstrip() + '\noutput = "one"\n\n[[evaluation]]\nevaluator = "perplexity"\n' \
                                           'data = "eval.txt"\n'
    follows = write_project(folder, text, "follows.toml")
    result = run("eval", follows)
    rows = json.loads((folder / "one.eval.json").read_text())
    assert [row["model"] for row in rows] == [str(folder / "one")] and "one" in result.output
    merged = run("eval", folder / "out", "--evaluator", "perplexity", "--param", "data=" + str(folder / "eval.txt"))
    assert json.loads((folder / "out.eval.json").read_text())[0]["metrics"] != rows[0]["metrics"]
    assert "perplexity" in merged.output
    untuned = write_project(folder, text.replace('output = "one"', 'output = "not-yet"'), "untuned.toml")
    result = CliRunner().invoke(cli, ["eval", str(untuned)])
    assert result.exit_code == 1
    assert result.output.strip() == (f"Error: {untuned}: the output {folder / 'not-yet'} does not exist yet; "
                                     f"run `mixcli tune {untuned}` first")


def drop_tensor(source: Path, folder: Path, name: str) -> Path:
    """A copy of the model in ``source`` whose weights lack ``name``."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(source, folder)
    for shard in folder.glob("*.safetensors"):
        tensors = load_file(shard)
        if tensors.pop(name, None) is not None:
            save_file(tensors, str(shard), metadata={"format": "pt"})
    return folder


def tune_fails(args, message):
    result = CliRunner().invoke(cli, ["tune", *map(str, args)])
    assert result.exit_code == 1, result.output
    assert result.output.strip().splitlines()[-1] == f"Error: {message}", result.output


def test_tune_mistakes_give_one_line_errors(tuned, tmp_path, llama_family):
    folder, project = tuned
    text = project.read_text()
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    bad = write_project(tmp_path, text.replace(str(folder / "train.jsonl"), str(empty)).replace(
        'path = "out"', f'path = "{folder / "out"}"'))
    tune_fails([bad, "--out", tmp_path / "t1"], f"[tune] data: data file {empty} is empty")
    gpu = write_project(tmp_path, text.replace("[tune]", '[tune]\ndevice = "gpu"'), "gpu.toml")
    tune_fails([gpu, "--out", tmp_path / "t1"], "gpu.toml: [tune]: device must be 'auto', 'cpu', 'cuda', got 'gpu'")
    tune_fails([project, "--model", llama_family["base"], "--out", tmp_path / "t2"],
               f"mixcli tune: {llama_family['base']} holds a llama without experts (no num_local_experts / "
               "num_experts_per_tok in config.json); tune takes MoE outputs of moe_merge or moe_upcycle")
    router = "model.layers.1.mlp.gate.weight"
    partial = drop_tensor(folder / "out", tmp_path / "partial", router)
    tune_fails([project, "--model", partial, "--out", tmp_path / "t3"],
               f"mixcli tune: the model in {partial} has no stored weight for '{router}' (transformers would "
               "initialise it randomly); re-save the complete model with save_pretrained")
    assert not any((tmp_path / f"t{i}").exists() for i in (1, 2, 3))


def test_a_base_missing_a_weight_is_refused_at_plan_time(tmp_path, llama_family):
    norm = "model.layers.2.post_attention_layernorm.weight"
    base = drop_tensor(llama_family["base"], tmp_path / "base", norm)
    project = merge_project(tmp_path, {**llama_family, "base": base}, experts=("ft1", "ft2"), hidden_dtype="float32")
    fails(project, f"project.toml: [method]: model 'base' has no tensor '{norm}', which its config.json needs; "
                   "re-save the complete model with save_pretrained")


def test_router_initialisation_refuses_weights_the_config_does_not_fit(tmp_path, llama_family):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(llama_family["base"], base)
    config = json.loads((base / "config.json").read_text())
    config["intermediate_size"] += 1  # every MLP weight is now mis-shaped for the config
    (base / "config.json").write_text(json.dumps(config))
    project = merge_project(tmp_path, {**llama_family, "base": base}, experts=("ft1", "ft2"), hidden_dtype="float32")
    fails(project, f"project.toml: [method]: gate_mode 'hidden': the model in {base} stores "
                   "'model.layers.0.mlp.down_proj.weight', 'model.layers.0.mlp.gate_proj.weight', "
                   "'model.layers.0.mlp.up_proj.weight' and 9 more in a shape its config.json does not give "
                   "(transformers would initialise them randomly); re-save the complete model with save_pretrained")


def test_prompt_routers_need_no_special_tokens(tmp_path, llama_family):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(llama_family["base"], base)
    tokenizer = tiny_models.tokenizer()
    tokenizer.bos_token = tokenizer.eos_token = tokenizer.pad_token = None
    tokenizer.save_pretrained(base)
    for mode in ("hidden", "cheap_embed"):
        folder = tmp_path / mode
        folder.mkdir()
        project = merge_project(folder, {**llama_family, "base": base}, experts=("ft1", "ft2"), gate_mode=mode,
                                hidden_dtype="float32")
        run("merge", project)
        routers = [t for n, t in tiny_models.load_tensors(folder / "out").items() if n.endswith(".mlp.gate.weight")]
        assert routers and all(torch.isfinite(t).all() and t.abs().sum() > 0 for t in routers)


def test_tune_follows_the_learning_rate_schedule(tuned, tmp_path):
    # 2 warm-up steps, then cosine from lr to 0.1·lr: the rates the log records are the formula's
    folder, project = tuned
    schedule = 'lr_scheduler_type = "cosine"\nwarmup_steps = 2\nmin_lr_rate = 0.1\n'
    path = write_project(tmp_path, project.read_text().replace("[tune]", "[tune]\n" + schedule), "sched.toml")
    run("tune", path, "--model", folder / "out", "--out", tmp_path / "t", "--no-progress")
    history = json.loads((tmp_path / "t" / "tune_log.json").read_text())["history"]
    cosine = [0.1 + 0.9 * (1 + math.cos(math.pi * t / 2)) / 2 for t in (0, 1)]
    assert [h["lr"] for h in history] == pytest.approx([0.01 * f for f in (1 / 2, 2 / 2, *cosine)])


@pytest.mark.parametrize("setting, message", [
    ("lr = nan", "lr must be a finite number > 0, got nan"),
    ("lr = -1.0", "lr must be a finite number > 0, got -1.0"),
    ("weight_decay = -1.0", "weight_decay must be a finite number >= 0, got -1.0"),
    ("aux_loss_coef = nan", "aux_loss_coef must be a finite number >= 0, got nan"),
    ("grad_clip = nan", "grad_clip must be a finite number >= 0, got nan"),
    ('lr_scheduler_type = "step"', "'lr_scheduler_type' must be 'constant', 'linear', 'cosine', got 'step'"),
    ("warmup_ratio = 2.0", "'warmup_ratio' must be a number in [0, 1], got 2.0"),
])
def test_tune_numbers_that_cannot_train_are_one_line_errors(tuned, tmp_path, setting, message):
    # AdamW raised a traceback for these; a NaN balance coefficient wrote NaN routers, exit 0
    folder, project = tuned
    key = setting.split(" = ")[0]
    text = "".join(line for line in project.read_text().splitlines(keepends=True) if not line.startswith(f"{key} ="))
    bad = write_project(tmp_path, text.replace("[tune]", f"[tune]\n{setting}"), "bad.toml")
    tune_fails([bad, "--model", folder / "out", "--out", tmp_path / "t"], f"bad.toml: [tune]: {message}")
    assert not (tmp_path / "t").exists()


def _answer_ce(folder, rows):
    """Mean CE of <s> prompt answer </s> on the answer tokens and EOS, with stock transformers."""
    tok = tiny_models.tokenizer()
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            prompt = [1] + tok(row["prompt"], add_special_tokens=False)["input_ids"]
            ids = prompt + tok(row["answer"], add_special_tokens=False)["input_ids"] + [2]
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
            for j in range(len(prompt), len(ids)):
                total -= float(logp[j - 1, ids[j]])
                count += 1
    return total / count


def test_tuning_with_the_defaults_lowers_held_out_loss(tmp_path):
    # a family whose experts differ (task vectors of scale 0.3); [tune] names only the data
    family = tiny_models.build_family(tmp_path / "family", "llama", experts=3, seed=7, layers=2, delta=0.3)
    import random

    rng = random.Random(0)
    pairs = [(a, b) for a in range(10) for b in range(10)]
    rng.shuffle(pairs)
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a, b in pairs]
    train, held_out = rows[:60], rows[60:]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    project = merge_project(tmp_path, family, tune='[tune]\ndata = "train.jsonl"\n')
    run("merge", project)
    run("tune", project, "--no-progress")
    before, after = _answer_ce(tmp_path / "out", held_out), _answer_ce(tmp_path / "out-tuned", held_out)
    assert after < before - 0.01, (before, after)
    log = json.loads((tmp_path / "out-tuned" / "tune_log.json").read_text())
    assert log["settings"]["answer_only"] is None and log["settings"]["eval_fraction"] == 0.0
