"""SMILE upscaling (mixcli-smile) on tiny seeded ViTs and Llamas built here, through the CLI and
transformers' Auto classes: the spec's invariants, save/load, the parameter-count formula
(with the spec's CLIP ViT-B/32 and Mistral-7B figures, on the meta device) and one-line errors."""

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
import transformers
from click.testing import CliRunner

from conftest import write_project
from mixcli.cli import cli
from mixcli.plugins import register_architectures
from mixcli_smile.construction import task_factors
from mixcli_smile.modeling import CONFIGS, MODELS, SmileLinear
from mixcli_smile.smile_upscaling import extra_parameters, linear_shapes

register_architectures()


def vit_config():
    return transformers.ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=32, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)


@pytest.fixture(scope="module")
def vits(tmp_path_factory):
    """A ViT base and two experts: the base plus seeded task vectors on every tensor."""
    root = tmp_path_factory.mktemp("smile_vit")
    torch.manual_seed(0)
    base = transformers.ViTModel(vit_config()).eval()
    base.save_pretrained(root / "base")
    gen = torch.Generator().manual_seed(1)
    for t in range(2):
        expert = transformers.ViTModel(vit_config()).eval()
        expert.load_state_dict({k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in base.state_dict().items()})
        expert.save_pretrained(root / f"t{t}")
    return root


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """A CLIP vision tower base and two experts (q/k/v/out_proj, fc1/fc2 with biases)."""
    root = tmp_path_factory.mktemp("smile_clip")
    config = transformers.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=8, patch_size=4, num_channels=1)
    torch.manual_seed(0)
    base = transformers.CLIPVisionModel(config).eval()
    base.save_pretrained(root / "base")
    gen = torch.Generator().manual_seed(2)
    for t in range(2):
        expert = transformers.CLIPVisionModel(config).eval()
        expert.load_state_dict({k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in base.state_dict().items()})
        expert.save_pretrained(root / f"t{t}")
    return root


def project(folder, models: dict, extra="", base="base", out="out"):
    lines = "\n".join(f'{name} = "{path}"' for name, path in models.items())
    return write_project(folder, f'[models]\n{lines}\n[method]\nname = "smile_upscaling"\nbase = "{base}"\n{extra}\n'
                                 f'[output]\npath = "{out}"\n')


def run(*args, code=0):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == code, result.output + repr(result.exception)
    return result


def images(n=4, seed=0):
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_one_expert_at_full_rank_reproduces_the_fine_tune(vits, tmp_path):
    # every Linear of this ViT has rank 16 (16x16, 32x16, 16x32): k = 16 keeps the whole task vector;
    # with one expert and average_experts the other tensors are the fine-tune's too
    path = project(tmp_path, {"base": vits / "base", "t0": vits / "t0"}, "k = 16\naverage_experts = true")
    run("merge", path, "--no-progress")
    smile = transformers.AutoModel.from_pretrained(tmp_path / "out").eval()
    assert type(smile).__name__ == "SmileViTModel"
    assert sum(isinstance(m, SmileLinear) for m in smile.modules()) == 2 * 6 + 1  # 6 per layer + pooler
    fine_tune = transformers.ViTModel.from_pretrained(vits / "t0").eval()
    x = images()
    with torch.no_grad():
        got, want = smile(pixel_values=x), fine_tune(pixel_values=x)
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.pooler_output, want.pooler_output, rtol=1e-5, atol=1e-5)


def test_one_dense_expert_of_a_llama_is_the_fine_tune_where_only_linears_changed(llama_family, tmp_path):
    # the experts of the tiny Llama family change every tensor; with average_experts and one expert
    # the other tensors are that expert's, so the whole model must equal the fine-tune
    path = project(tmp_path, {"base": llama_family["base"], "ft1": llama_family["ft1"]},
                   "k = -1\naverage_experts = true")
    run("merge", path, "--no-progress")
    smile = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(smile).__name__ == "SmileLlamaForCausalLM"
    assert sum(isinstance(m, SmileLinear) for m in smile.modules()) == 4 * 7  # q k v o gate up down, not lm_head
    fine_tune = transformers.AutoModelForCausalLM.from_pretrained(llama_family["ft1"]).eval()
    ids = torch.tensor([[1, 5, 9, 12, 3, 7]])
    with torch.no_grad():
        torch.testing.assert_close(smile(ids).logits, fine_tune(ids).logits, rtol=1e-4, atol=1e-4)


def orthogonal_experts(d_in=12, d_out=10, n=3, r=3, seed=0):
    """Task vectors whose row spaces are mutually orthogonal r-dimensional subspaces."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d_in, d_in, generator=g, dtype=torch.float64))
    w0, b0 = torch.randn(d_out, d_in, generator=g), torch.randn(d_out, generator=g)
    bases = [q[:, i * r:(i + 1) * r].float() for i in range(n)]
    weights = [w0 + torch.randn(d_out, r, generator=g) @ basis.T for basis in bases]
    biases = [b0 + 0.1 * torch.randn(d_out, generator=g) for _ in range(n)]
    return w0, b0, weights, biases, bases


def smile_linear(w0, b0, weights, biases, gate_k, k, top_k=1):
    """A SmileLinear filled from the plan's own per-expert factors."""
    n = len(weights)
    layer = SmileLinear(w0.shape[1], w0.shape[0], n, top_k, gate_k, k, True)
    with torch.no_grad():
        layer.shared_linear.weight.copy_(w0)
        layer.shared_linear.bias.copy_(b0)
        gates = []
        for i, (wi, bi) in enumerate(zip(weights, biases)):
            gate, u, svh = task_factors(w0, wi, gate_k, k)
            gates.append(gate)
            expert = layer.experts[i]
            if k > 0:
                expert.u.copy_(u)
                expert.svh.copy_(svh)
            else:
                expert.weight.copy_(wi - w0)
            expert.bias.copy_(bi - b0)
        layer.gate.weight.copy_(torch.cat(gates))
    return layer


@pytest.mark.parametrize("k", [-1, 3])
def test_routing_picks_the_expert_whose_subspace_the_input_lies_in(k):
    w0, b0, weights, biases, bases = orthogonal_experts()
    layer = smile_linear(w0, b0, weights, biases, gate_k=3, k=k)
    g = torch.Generator().manual_seed(5)
    for i, basis in enumerate(bases):
        x = (basis @ torch.randn(3, 6, generator=g)).T  # 6 tokens in expert i's input subspace
        chosen = layer.routing_weights(x)
        assert torch.equal(chosen, torch.nn.functional.one_hot(torch.full((6,), i), 3).float())
        torch.testing.assert_close(layer(x), x @ weights[i].T + biases[i], rtol=1e-5, atol=1e-5)


def test_without_routing_use_diff_the_router_reads_the_fine_tuned_weights_subspace():
    w0, b0, weights, _, _ = orthogonal_experts()
    gate, u, svh = task_factors(w0, weights[1], 4, 3, routing_use_diff=False)
    _, _, vh = torch.linalg.svd(weights[1].double())
    torch.testing.assert_close(gate.double().T @ gate.double(), vh[:4].T @ vh[:4], atol=1e-5, rtol=0)
    torch.testing.assert_close(u @ svh, weights[1] - w0, atol=1e-5, rtol=1e-5)  # experts: still the task vector


def test_routing_weights_one_expert_uniform_top_k_and_full_gate():
    w0, b0, weights, biases, _ = orthogonal_experts()
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(2))
    single = smile_linear(w0, b0, weights[:1], biases[:1], gate_k=2, k=3)
    assert torch.equal(single.routing_weights(x), torch.ones(5, 1))
    # gate_k = d_in with full matrices: every logit is ‖x‖, so top_k = n averages the experts uniformly
    full = smile_linear(w0, b0, weights, biases, gate_k=12, k=-1, top_k=3)
    torch.testing.assert_close(full.gate(x), x.norm(dim=-1, keepdim=True).expand(5, 3), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(full(x), x @ w0.T + b0 + sum((x @ (w - w0).T + (b - b0)) for w, b in
                                                             zip(weights, biases)) / 3, rtol=1e-4, atol=1e-4)
    # top_k = 2 renormalises the two largest softmax weights
    two = smile_linear(w0, b0, weights, biases, gate_k=2, k=-1, top_k=2)
    p = torch.softmax(two.gate(x), -1)
    top, index = p.topk(2, -1)
    expected = torch.zeros_like(p).scatter(-1, index, top / top.sum(-1, keepdim=True))
    torch.testing.assert_close(two.routing_weights(x), expected)
    assert bool((two.routing_weights(x) > 0).sum(-1).eq(2).all())


def test_experts_are_the_truncated_svd_and_the_router_the_top_right_singular_vectors(vits, tmp_path):
    path = project(tmp_path, {n: vits / n for n in ("base", "t0", "t1")}, "k = 4\ngate_k = 3")
    run("merge", path, "--no-progress")
    smile = transformers.AutoModel.from_pretrained(tmp_path / "out").eval()
    layer = smile.layers[1].mlp.fc2
    w0 = transformers.ViTModel.from_pretrained(vits / "base").state_dict()["layers.1.mlp.fc2.weight"]
    for i, t in enumerate(("t0", "t1")):
        delta = transformers.ViTModel.from_pretrained(vits / t).state_dict()["layers.1.mlp.fc2.weight"] - w0
        u, s, vh = torch.linalg.svd(delta.double())
        expert = layer.experts[i]
        torch.testing.assert_close((expert.u @ expert.svh).double(), (u[:, :4] * s[:4]) @ vh[:4], rtol=1e-5, atol=1e-6)
        rows = layer.gate.weight[3 * i:3 * i + 3].double()
        # the same subspace as the top 3 right singular vectors (signs are LAPACK's)
        torch.testing.assert_close(rows @ rows.T, torch.eye(3, dtype=torch.float64), atol=1e-5, rtol=0)
        torch.testing.assert_close(rows.T @ rows, vh[:3].T @ vh[:3], atol=1e-5, rtol=0)


def test_save_load_round_trip_through_auto_classes_without_the_sources(llama_family, qwen2_tied_family, vits, clips,
                                                                      tmp_path):
    from mixcli.core import prepare
    from mixcli_smile.construction import model_from_plan

    cases = [("vit", {n: vits / n for n in ("base", "t0", "t1")}, "k = 4\ngate_k = 2\ntop_k = 2", "AutoModel"),
             ("clip", {n: clips / n for n in ("base", "t0", "t1")}, "k = 4\ngate_k = 2", "AutoModel"),
             ("llama", {n: llama_family[n] for n in ("base", "ft1", "ft2", "ft3")}, "k = 8\ngate_k = 4",
              "AutoModelForCausalLM"),
             # q/k/v biases and tied embeddings (lm_head is not stored, and tied again on load)
             ("qwen2", {n: qwen2_tied_family[n] for n in ("base", "ft1")}, "k = 4\ngate_k = 2",
              "AutoModelForCausalLM")]
    for name, models, extra, auto in cases:
        folder = tmp_path / name
        folder.mkdir()
        path = project(folder, models, extra)
        run("merge", path, "--no-progress")
        out = folder / "out"
        assert not [p for p in out.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
        loaded = getattr(transformers, auto).from_pretrained(out).eval()
        in_memory = model_from_plan(prepare(path).plan)
        loaded.save_pretrained(folder / "again")
        again = getattr(transformers, auto).from_pretrained(folder / "again").eval()
        inputs = ({"pixel_values": images()} if name in ("vit", "clip") else {"input_ids": torch.tensor([[1, 5, 9, 12, 3]])})
        with torch.no_grad():
            first = loaded(**inputs)[0]
            torch.testing.assert_close(in_memory(**inputs)[0], first, rtol=1e-5, atol=1e-5)
            # the same tensors bit for bit; outputs within float rounding (CPU kernels may round
            # differently for differently aligned copies of the same weights)
            torch.testing.assert_close(again(**inputs)[0], first, rtol=1e-6, atol=1e-6)
        # (the in-memory model recomputes the SVDs, whose rounding and signs may follow the thread count)
        theirs = again.state_dict()
        assert all(torch.equal(theirs[key], value) for key, value in loaded.state_dict().items())
        config = json.loads((out / "config.json").read_text())
        assert config["model_type"] == f"smile_{json.loads((models['base'] / 'config.json').read_text())['model_type']}"
        assert config["num_local_experts"] == len(models) - 1
        for model, folder_in in models.items():  # the inputs' weight files, hashed here
            files = sorted(Path(folder_in).glob("*.safetensors"))
            assert config["mixcli"]["inputs"][model]["sha256"] == {
                f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def test_parameter_count_formula_matches_the_plan_the_evaluator_and_the_model(vits, tmp_path):
    path = project(tmp_path, {n: vits / n for n in ("base", "t0", "t1")}, "k = 4\ngate_k = 3")
    plan = run("merge", path, "--dry-run").output
    run("merge", path, "--no-progress")
    # the formula by hand: per Linear n·g·d_in + n·(k·(d_out + d_in) + d_out), all Linears have biases
    shapes = [(16, 16)] * 4 + [(32, 16), (16, 32)]  # q k v o fc1 fc2
    per_layer = sum(2 * 3 * d_in + 2 * (4 * (d_out + d_in) + d_out) for d_out, d_in in shapes)
    pooler = 2 * 3 * 16 + 2 * (4 * 32 + 16)
    pretrained = sum(p.numel() for p in transformers.ViTModel(vit_config()).parameters())
    total = pretrained + 2 * per_layer + pooler
    assert f"parameters {total:,} = pretrained {pretrained:,}" in " ".join(plan.split())
    result = run("eval", tmp_path / "out", "--evaluator", "parameters")
    assert re.search(r"total\W+(\d+)", result.output).group(1) == str(total), result.output
    loaded = transformers.AutoModel.from_pretrained(tmp_path / "out")
    assert sum(p.numel() for p in loaded.parameters()) == total


def test_clip_vit_b32_parameter_count_of_the_spec_on_the_meta_device():
    config = transformers.CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                           num_attention_heads=12, image_size=224, patch_size=32)
    with torch.device("meta"):
        plain = transformers.CLIPVisionModel(config)
        linears = linear_shapes(plain)
        smile_config = CONFIGS["smile_clip_vision_model"](num_local_experts=8, rank_of_router=16, rank_of_expert=32,
                                                          smile_modules=list(linears), **config.to_dict())
        smile = MODELS["smile_clip_vision_model"]["AutoModel"](smile_config)
    assert sum(p.numel() for p in plain.parameters()) == 87_456_000
    router, experts = extra_parameters(linears, 8, 16, 32, set(linears))
    assert router + experts == 12 * 4_478_976
    assert sum(p.numel() for p in smile.parameters()) == 87_456_000 + router + experts == 141_203_712


@pytest.mark.parametrize("n, k, total", [(1, 8, 7_272_665_088), (3, 512, 11_298_148_352)])
def test_mistral_7b_parameter_counts_of_the_spec(n, k, total):
    config = transformers.MistralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                        num_attention_heads=32, num_key_value_heads=8, vocab_size=32000)
    with torch.device("meta"):
        plain = transformers.MistralForCausalLM(config)
    linears = linear_shapes(plain.model)
    assert sum(p.numel() for p in plain.parameters()) == 7_241_732_096
    router, experts = extra_parameters(linears, n, 8, k, set())
    assert 7_241_732_096 + router + experts == total


def test_an_unchanged_linear_warns_and_computes_the_pretrained_linear(vits, tmp_path):
    base = transformers.ViTModel.from_pretrained(vits / "base")
    for t in ("t0", "t1"):
        model = transformers.ViTModel.from_pretrained(vits / t)
        model.pooler.load_state_dict(base.pooler.state_dict())
        model.save_pretrained(tmp_path / t)
    path = project(tmp_path, {"base": vits / "base", "t0": tmp_path / "t0", "t1": tmp_path / "t1"}, "k = 4")
    result = run("merge", path, "--no-progress")
    assert "no fine-tuned model changes Linear 'pooler.dense'" in " ".join(result.output.split())
    smile = transformers.AutoModel.from_pretrained(tmp_path / "out")
    for expert in smile.pooler.dense.experts:
        assert not expert.u.any() and not expert.svh.any() and not expert.bias.any()
    x = torch.randn(3, 16)
    with torch.no_grad():
        torch.testing.assert_close(smile.pooler.dense(x), base.pooler.dense(x), rtol=0, atol=0)


def gpt2(folder: Path) -> Path:
    config = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50, n_positions=32)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("extra, message", [
    ("k = 0", "[method]: k = 0 keeps no component of the task vectors; use k >= 1"),
    ("k = 20", "[method]: k = 20 is more than the rank 16 of Linear 'layers.0.attention.q_proj' (16x16) of the "
               "'vit' model; use k <= 16"),
    ("gate_k = 17\nk = 4", "[method]: gate_k = 17 is more than the 16 singular vectors of Linear "
                           "'layers.0.attention.q_proj' (16x16, d_in) of the 'vit' model; use gate_k <= 16"),
    ("gate_k = 33\nk = 4\nmodules = [\"fc2\"]", "gate_k = 33 is more than the 32 singular vectors"),
    ("gate_k = 20\nk = 4\nfull_matrices = false\nmodules = [\"fc2\"]",
     "gate_k = 20 is more than the 16 singular vectors of Linear 'layers.0.mlp.fc2' (16x32, min(d_out, d_in) "
     "without full_matrices)"),
    ("top_k = 3\nk = 4", "[method]: top_k = 3 but there are 2 fine-tuned models (experts); use top_k <= 2"),
    ("k = 4\nmodules = [\"no_such\"]", "[method]: the 'vit' base model has no Linear whose path contains one of "
                                       "modules = ['no_such'] that smile_upscaling can upscale"),
    ("k = -2", "[method]: parameter 'k' must be >= -1, got -2"),
])
def test_bad_parameters_are_one_line_errors_and_write_nothing(vits, tmp_path, extra, message):
    path = project(tmp_path, {n: vits / n for n in ("base", "t0", "t1")}, extra)
    for command in (["validate"], ["merge", "--no-progress"]):
        result = run(*command, path, code=1)
        assert message in " ".join(result.output.split()), result.output
        assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_model_with_no_linear_smile_can_use_is_a_one_line_error(tmp_path):
    models = {name: gpt2(tmp_path / name) for name in ("base", "ft")}
    path = project(tmp_path, models)
    result = run("merge", path, "--no-progress", code=1)
    assert "smile_upscaling has no SMILE architecture for model type 'gpt2'; it upscales the Linears of " \
           "clip_vision_model, llama, mistral, qwen2, vit models" in " ".join(result.output.split()), result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_one_set_of_defaults_fusionbenchs_yaml_in_code_template_and_list_methods(tmp_path):
    from mixcli_smile.smile_upscaling import Params

    yaml = {"gate_k": 1, "k": 128, "top_k": 1, "full_matrices": True, "routing_use_diff": True,
            "average_experts": False}
    assert {key: getattr(Params(), key) for key in yaml} == yaml
    listed = " ".join(run("list-methods", "smile_upscaling").output.split())
    for key, value in yaml.items():
        assert f"{key} {type(value).__name__}, default {json.dumps(value)}" in listed, key
    run("init", "smile_upscaling", "--out", tmp_path / "p.toml")
    template = (tmp_path / "p.toml").read_text()
    for key, value in yaml.items():
        if key != "k":
            assert f"# {key} = {json.dumps(value)}  #" in template, key
    # the template's starting point fits small models; it says what the default is
    assert "k = 8  #" in template and "(int, default 128)" in template
