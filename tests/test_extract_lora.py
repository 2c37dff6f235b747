"""mixcli extract-lora: the adapter stock PEFT loads; full rank reproduces the fine-tune; low rank
has the error the table reports (recomputed here from the SVD); extracted adapters merged back
with `lora =` equal PEFT's merge_and_unload."""

import json
import math
import re
import shutil

import peft
import pytest
import torch
import transformers
from click.testing import CliRunner
from safetensors.torch import load_file

import tiny_models
from conftest import write_project
from lora_helpers import peft_merged
from mixcli.cli import cli

PREFIX = "base_model.model."


def extract(*args):
    result = CliRunner().invoke(cli, ["extract-lora", *map(str, args)])
    return result


def assert_one_line_error(result, *fragments):
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def reported_total(output: str) -> float:
    return float(re.search(r"│ total .*│\s*([0-9.e+-]+) │", output).group(1))


def peft_logits(base, adapter, text="12+34="):
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    model = peft.PeftModel.from_pretrained(model, adapter).eval()
    tok = transformers.AutoTokenizer.from_pretrained(base)
    with torch.no_grad():
        return model(**tok(text, return_tensors="pt")).logits


def test_full_rank_reproduces_the_fine_tune_through_peft(tmp_path, llama_family):
    base, ft = llama_family["base"], llama_family["ft1"]
    result = extract("--base", base, "--model", ft, "--out", tmp_path / "adapter", "--max-rank", 160)
    assert result.exit_code == 0, result.output
    assert reported_total(result.output) < 1e-5
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 64 and config["lora_alpha"] == 64  # the largest rank used; scale 1 everywhere
    # k/v project to 32 dimensions, the head to the 52-token vocabulary: full rank is lower there
    assert config["rank_pattern"] == config["alpha_pattern"] == {
        f"model.layers.{i}.self_attn.{m}": 32 for i in range(4) for m in ("k_proj", "v_proj")} | {"lm_head": 52}
    assert "model.embed_tokens" in config["modules_to_save"] and "model.norm" in config["modules_to_save"]
    torch.testing.assert_close(peft_logits(base, tmp_path / "adapter"), tiny_models.logits(ft), rtol=1e-4, atol=1e-4)
    merged = peft_merged(base, tmp_path / "adapter").state_dict()
    ft_tensors = tiny_models.load_tensors(ft)
    for name, tensor in ft_tensors.items():
        torch.testing.assert_close(merged[name], tensor, rtol=0, atol=2e-6)
    # saved modules are the fine-tune's own tensors
    assert torch.equal(merged["model.embed_tokens.weight"], ft_tensors["model.embed_tokens.weight"])
    assert torch.equal(merged["model.norm.weight"], ft_tensors["model.norm.weight"])


def test_low_rank_error_is_what_the_table_reports(tmp_path, llama_family):
    base, ft = llama_family["base"], llama_family["ft2"]
    out = tmp_path / "adapter"
    result = extract("--base", base, "--model", ft, "--out", out, "--max-rank", 4, "--no-distribute-scale")
    assert result.exit_code == 0, result.output
    base_t, ft_t = tiny_models.load_tensors(base), tiny_models.load_tensors(ft)
    factors = load_file(out / "adapter_model.safetensors")
    residual = total = 0.0
    for name in ft_t:
        delta = (ft_t[name].double() - base_t[name].double())
        total += float(delta.norm()) ** 2
        module = name.removesuffix(".weight")
        if f"{PREFIX}{module}.lora_A.weight" in factors:
            a, b = factors[f"{PREFIX}{module}.lora_A.weight"], factors[f"{PREFIX}{module}.lora_B.weight"]
            assert a.shape[0] == 4
            s = torch.linalg.svdvals(delta)
            # Eckart–Young: the best rank-4 error is the tail of the singular values
            best = float(s[4:].square().sum().sqrt())
            ours = float((delta - b.double() @ a.double()).norm())
            assert ours == pytest.approx(best, rel=1e-4)
            # without distribute-scale, B = U_k has orthonormal columns
            torch.testing.assert_close(b.T @ b, torch.eye(4), rtol=0, atol=1e-5)
            residual += ours ** 2
        else:  # saved whole: exact
            assert torch.equal(factors[f"{PREFIX}{name}"], ft_t[name])
    assert reported_total(result.output) == pytest.approx(math.sqrt(residual / total), rel=1e-3)
    assert "model.layers.0.self_attn.q_proj" in result.output


def test_extracted_adapter_merged_back_with_lora_equals_peft(tmp_path, llama_family):
    base, ft = llama_family["base"], llama_family["ft3"]
    out = tmp_path / "adapter"
    assert extract("--base", base, "--model", ft, "--out", out, "--max-rank", 6, "--embed-lora").exit_code == 0
    factors = load_file(out / "adapter_model.safetensors")
    assert factors[f"{PREFIX}model.embed_tokens.lora_embedding_A"].shape == (6, 52)
    assert factors[f"{PREFIX}model.embed_tokens.lora_embedding_B"].shape == (64, 6)
    project = write_project(tmp_path, f'[models]\nm = {{ path = "{base}", lora = "{out}" }}\n'
                                      '[method]\nname = "passthrough"\n[output]\npath = "merged"\n')
    result = CliRunner().invoke(cli, ["merge", str(project)])
    assert result.exit_code == 0, result.output
    reference = peft_merged(base, out).state_dict()
    written = tiny_models.load_tensors(tmp_path / "merged")
    assert written.keys() == reference.keys()
    for name in written:
        assert torch.equal(written[name], reference[name]), name


def test_sv_epsilon_finds_an_exact_low_rank_delta_and_drops_tiny_ones(tmp_path, llama_family):
    base = llama_family["base"]
    tensors = tiny_models.load_tensors(base)
    generator = torch.Generator().manual_seed(11)
    q = "model.layers.0.self_attn.q_proj.weight"
    u, v = torch.randn(64, 2, generator=generator), torch.randn(2, 64, generator=generator)
    tensors[q] = tensors[q] + u @ v  # rank 2, singular values far above 0.5
    tensors["model.layers.1.mlp.up_proj.weight"] += 1e-4 * torch.randn(160, 64, generator=generator)
    ft = shutil.copytree(base, tmp_path / "ft")
    from safetensors.torch import save_file

    save_file(tensors, str(ft / "model.safetensors"), metadata={"format": "pt"})
    result = extract("--base", base, "--model", ft, "--out", tmp_path / "adapter", "--sv-epsilon", 0.5)
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["model.layers.0.self_attn.q_proj"] and config["r"] == 2
    assert 0 not in config["rank_pattern"].values()
    assert re.search(r"model\.layers\.1\.mlp\.up_proj\s*│ dropped\s*│\s*0 │", result.output)
    merged = peft_merged(base, tmp_path / "adapter").state_dict()  # stock PEFT loads it
    torch.testing.assert_close(merged[q], tensors[q], rtol=0, atol=1e-5)
    # a threshold above everything leaves nothing to extract: an error, not an adapter PEFT refuses
    assert_one_line_error(extract("--base", base, "--model", ft, "--out", tmp_path / "none", "--sv-epsilon", 1e6),
                          "no module has a low-rank difference to extract")
    assert not (tmp_path / "none").exists()


def test_bfloat16_models_give_a_bfloat16_adapter_from_a_float32_svd(tmp_path, llama_bf16_family):
    base, ft = llama_bf16_family["base"], llama_bf16_family["ft1"]
    result = extract("--base", base, "--model", ft, "--out", tmp_path / "adapter", "--max-rank", 64)
    assert result.exit_code == 0, result.output
    factors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    a = factors[f"{PREFIX}model.layers.0.self_attn.q_proj.lora_A.weight"]
    b = factors[f"{PREFIX}model.layers.0.self_attn.q_proj.lora_B.weight"]
    assert a.dtype == b.dtype == torch.bfloat16
    base_t, ft_t = tiny_models.load_tensors(base), tiny_models.load_tensors(ft)
    name = "model.layers.0.self_attn.q_proj.weight"
    delta = ft_t[name].float() - base_t[name].float()
    # only the rounding of A and B to bfloat16 remains (a few bf16 ulps relative to ‖Δ‖)
    assert float((delta - b.float() @ a.float()).norm() / delta.norm()) < 2e-2
    assert reported_total(result.output) < 2e-2


def test_tied_embeddings_are_saved_with_the_head_so_peft_reties_them(tmp_path, tied_family):
    base, ft = tied_family["base"], tied_family["ft1"]
    result = extract("--base", base, "--model", ft, "--out", tmp_path / "adapter", "--max-rank", 64, "--embed-lora")
    assert result.exit_code == 0, result.output
    assert "ties its head to its input embeddings" in result.output
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["ensure_weight_tying"] is True and "model.embed_tokens" in config["modules_to_save"]
    # the head is the fine-tune's embedding in PEFT too, not the base's
    torch.testing.assert_close(peft_logits(base, tmp_path / "adapter"), tiny_models.logits(ft), rtol=1e-4, atol=1e-4)
    project = write_project(tmp_path, f'[models]\nm = "{base}+{tmp_path / "adapter"}"\n'
                                      '[method]\nname = "passthrough"\n[output]\npath = "merged"\n')
    assert CliRunner().invoke(cli, ["merge", str(project)]).exit_code == 0
    written = tiny_models.load_tensors(tmp_path / "merged")
    assert "lm_head.weight" not in written  # still tied
    assert torch.equal(written["model.embed_tokens.weight"], tiny_models.load_tensors(ft)["model.embed_tokens.weight"])


def test_bias_deltas_round_trip_through_peft(tmp_path):
    cfg = tiny_models.config(layers=2)
    cfg.attention_bias = True
    torch.manual_seed(12)
    base_model = transformers.LlamaForCausalLM(cfg)
    base = tiny_models.save(base_model, tmp_path / "base")
    with torch.no_grad():
        for name, param in base_model.named_parameters():
            if "self_attn" in name:
                param.add_(0.02 * torch.randn_like(param))
    ft = tiny_models.save(base_model, tmp_path / "ft")
    result = extract("--base", base, "--model", ft, "--out", tmp_path / "adapter", "--max-rank", 64,
                     "--include-regex", "self_attn")
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["lora_bias"] is True
    merged = peft_merged(base, tmp_path / "adapter").state_dict()
    for name, tensor in tiny_models.load_tensors(ft).items():
        torch.testing.assert_close(merged[name], tensor, rtol=0, atol=2e-6)


def test_existing_output_and_bad_options_are_one_line_errors(tmp_path, llama_family):
    base, ft = llama_family["base"], llama_family["ft1"]
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "keep.txt").write_text("mine")
    assert_one_line_error(extract("--base", base, "--model", ft, "--out", tmp_path / "adapter"),
                          "already exists; pass --force")
    assert (tmp_path / "adapter" / "keep.txt").read_text() == "mine"
    assert_one_line_error(extract("--base", base, "--model", ft, "--out", tmp_path / "x", "-i", "("),
                          "--include-regex '(': not a valid regular expression")
    torch.manual_seed(13)
    other = tiny_models.save(transformers.LlamaForCausalLM(tiny_models.config(layers=2)), tmp_path / "other")
    assert_one_line_error(extract("--base", other, "--model", ft, "--out", tmp_path / "x"),
                          "--base: the base model has no tensor 'model.layers.2.")
    assert not (tmp_path / "x").exists()
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    copy = shutil.copytree(ft, tmp_path / "ft")
    assert_one_line_error(extract("--base", base, "--model", copy, "--out", copy / "adapter", "--force"),
                          "lies inside the folder of --model")
    assert sorted(p.name for p in copy.iterdir()) == sorted(p.name for p in ft.iterdir())
    result = extract("--base", base, "--model", ft, "--out", tmp_path / "adapter", "--max-rank", 2, "--force")
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "adapter" / "keep.txt").exists()


def test_extract_lora_command_is_registered():
    result = CliRunner().invoke(cli, ["--help"])
    assert "extract-lora" in result.output


def test_a_model_plus_adapter_input_gives_back_the_adapters_change(tmp_path, llama_family):
    from lora_helpers import make_adapter

    base = llama_family["base"]
    adapter = make_adapter(base, tmp_path / "lora", target_modules=["q_proj", "v_proj"])  # r 4, alpha 8
    result = extract("--base", base, "--model", f"{base}+{adapter}", "--out", tmp_path / "again", "--max-rank", 8)
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert config["r"] == 8 and len(config["target_modules"]) == 8 and config["modules_to_save"] is None
    assert reported_total(result.output) < 1e-5  # the change is rank 4: rank 8 holds it all
    ours = peft_merged(base, tmp_path / "again").state_dict()
    theirs = peft_merged(base, adapter).state_dict()
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=1e-6)
