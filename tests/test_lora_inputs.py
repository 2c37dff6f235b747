"""LoRA adapters as model inputs: every applied tensor equals PEFT's own merge_and_unload of the
same adapter, bitwise; bad adapters are one-line errors that leave nothing behind."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from click.testing import CliRunner

import tiny_models
from conftest import write_project
from lora_helpers import make_adapter, peft_merged
from mixcli.cli import cli
from mixcli.core import open_model
from mixcli.plugins import get_registry
from mixcli.project import ModelRef, read_project


def open_with_lora(base: Path, adapter: Path):
    return open_model(ModelRef("m", str(base), Path("."), "[models.m]", lora=str(adapter)), get_registry())


def assert_equals_peft(ckpt, merged_model):
    reference = merged_model.state_dict()
    for name in ckpt.tensors:
        ours = ckpt.tensor(name)
        assert ours.dtype == reference[name].dtype, name
        assert torch.equal(ours, reference[name]), f"{name}: {(ours.float() - reference[name].float()).abs().max()}"


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_one_line_error(result, *fragments):
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


ADAPTERS = {
    "plain": dict(target_modules=["q_proj", "v_proj"]),
    "patterns_embedding_saved": dict(target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
                                     modules_to_save=["lm_head"], rank_pattern={"layers.1.self_attn.q_proj": 2},
                                     alpha_pattern={"v_proj": 3}),
    "rslora": dict(target_modules=["q_proj", "o_proj", "gate_proj"], r=8, lora_alpha=5, use_rslora=True),
}


@pytest.mark.parametrize("kind", sorted(ADAPTERS))
def test_applied_tensors_equal_peft_merge_and_unload(kind, tmp_path, llama_family):
    adapter = make_adapter(llama_family["base"], tmp_path / "adapter", **ADAPTERS[kind])
    ckpt = open_with_lora(llama_family["base"], adapter)
    changed = [n for n in ckpt.tensors if type(ckpt.tensors[n].file).__name__ == "_Applied"]
    assert changed  # the adapter really reaches the tensors, lazily
    assert_equals_peft(ckpt, peft_merged(llama_family["base"], adapter))


def test_bfloat16_base_rounds_once_like_peft(tmp_path, llama_bf16_family):
    base = llama_bf16_family["base"]
    adapter = make_adapter(base, tmp_path / "adapter", dtype=torch.bfloat16, target_modules=["q_proj", "v_proj"])
    ckpt = open_with_lora(base, adapter)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert ckpt.tensor(name).dtype == torch.bfloat16
    # bf16(float(W) + s·B@A), not W + bf16(s·B@A)
    from safetensors.torch import load_file

    factors = load_file(adapter / "adapter_model.safetensors")
    a = factors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].float()
    b = factors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].float()
    w = tiny_models.load_tensors(base)[name]
    assert torch.equal(ckpt.tensor(name), (w.float() + (b @ a) * 2.0).to(torch.bfloat16))
    assert_equals_peft(ckpt, peft_merged(base, adapter, dtype=torch.bfloat16))


@pytest.mark.parametrize("bias", [dict(lora_bias=True), dict(bias="all")])
def test_lora_bias_and_trained_biases(bias, tmp_path):
    cfg = tiny_models.config(layers=2)
    cfg.attention_bias = True
    torch.manual_seed(5)
    base = tiny_models.save(transformers.LlamaForCausalLM(cfg), tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "adapter", target_modules=["q_proj", "k_proj"], **bias)
    ckpt = open_with_lora(base, adapter)
    assert type(ckpt.tensors["model.layers.0.self_attn.q_proj.bias"].file).__name__ == "_Applied"
    assert_equals_peft(ckpt, peft_merged(base, adapter))


def test_fan_in_fan_out_conv1d_layers(tmp_path):
    torch.manual_seed(6)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=52, n_positions=64)
    base = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(config).save_pretrained(base)
    adapter = make_adapter(base, tmp_path / "adapter", target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    assert_equals_peft(open_with_lora(base, adapter), peft_merged(base, adapter))
    settings = json.loads((adapter / "adapter_config.json").read_text())
    settings["fan_in_fan_out"] = False
    (adapter / "adapter_config.json").write_text(json.dumps(settings))
    project = write_project(tmp_path, f'[models]\nm = {{ path = "{base}", lora = "{adapter}" }}\n'
                                      '[method]\nname = "passthrough"\n[output]\npath = "out"\n')
    assert_one_line_error(run("merge", project), "[models.m] lora: adapter module 'transformer.h.0.attn.c_attn'",
                          "set fan_in_fan_out = true")


def test_resized_vocabulary_adapter_applies_with_its_tokenizer(tmp_path, llama_family):
    base = llama_family["base"]
    adapter = make_adapter(base, tmp_path / "adapter", resize=60, target_modules=["q_proj", "embed_tokens"],
                           modules_to_save=["lm_head"], tokenizer=True)
    settings = json.loads((adapter / "tokenizer_config.json").read_text())
    (adapter / "tokenizer_config.json").write_text(json.dumps(dict(settings, model_max_length=77)))
    ckpt = open_with_lora(base, adapter)
    assert ckpt.config["vocab_size"] == 60 and ckpt.tensors["lm_head.weight"].shape == (60, 64)
    assert_equals_peft(ckpt, peft_merged(base, adapter, resize=60))
    project = write_project(tmp_path, f'[models]\nm = {{ path = "{base}", lora = "{adapter}" }}\n'
                                      '[method]\nname = "passthrough"\n[output]\npath = "out"\n')
    result = run("merge", project)
    assert result.exit_code == 0, result.output
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.vocab_size == 60
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())["model_max_length"] == 77


def test_merge_with_lora_inputs_writes_peft_weights_and_both_spellings_agree(tmp_path, llama_family):
    base, ft1 = llama_family["base"], llama_family["ft1"]
    adapter = make_adapter(base, tmp_path / "adapter", target_modules=["q_proj", "v_proj", "up_proj"],
                           modules_to_save=["lm_head"])
    for name, spec in (("table", f'{{ path = "{base}", lora = "{adapter}" }}'), ("plus", f'"{base}+{adapter}"')):
        project = write_project(tmp_path, f'[models]\nm = {spec}\n[method]\nname = "passthrough"\n'
                                          f'[output]\npath = "{name}"\n', name=f"{name}.toml")
        result = run("merge", project)
        assert result.exit_code == 0, result.output
        assert f"+ LoRA `{adapter}`" in (tmp_path / name / "README.md").read_text()
    reference = peft_merged(base, adapter).state_dict()
    for name in ("table", "plus"):
        written = tiny_models.load_tensors(tmp_path / name)
        assert written.keys() == reference.keys()
        assert all(torch.equal(written[k], reference[k]) for k in written)
        # the recipe written beside the model keeps the adapter, so it rebuilds the same model
        assert read_project(tmp_path / name / "mixcli.toml").models["m"].lora == str(adapter)
    again = run("merge", tmp_path / "plus" / "mixcli.toml", "--out", tmp_path / "again")
    assert again.exit_code == 0, again.output
    rebuilt = tiny_models.load_tensors(tmp_path / "again")
    assert all(torch.equal(rebuilt[k], reference[k]) for k in reference)
    # in a merge with other models the adapter changes only its own model's contribution
    project = write_project(tmp_path, f'[models]\nbase = "{base}"\nft = "{ft1}"\nm = "{base}+{adapter}"\n'
                                      '[method]\nname = "task_arithmetic"\nbase = "base"\nweight = 1.0\n'
                                      '[output]\npath = "ta"\n', name="ta.toml")
    assert run("merge", project).exit_code == 0
    merged, base_t, ft_t = (tiny_models.load_tensors(p) for p in (tmp_path / "ta", base, ft1))
    name = "model.layers.2.self_attn.q_proj.weight"
    expected = base_t[name] + (ft_t[name] - base_t[name]) + (reference[name] - base_t[name])
    torch.testing.assert_close(merged[name], expected, rtol=0, atol=1e-6)
    assert not list(Path(adapter).glob("*merged*"))  # no cache, no merged copy anywhere


def test_project_parses_lora_key_and_plus_form(tmp_path):
    (tmp_path / "a+b").mkdir()
    project = write_project(tmp_path, '[models]\nx = "m+lora"\ny = { path = "m", lora = "l" }\nz = "a+b"\n'
                                      '[method]\nname = "linear"\n')
    models = read_project(project).models
    assert (models["x"].path, models["x"].lora) == ("m", "lora")
    assert (models["y"].path, models["y"].lora) == ("m", "l")
    assert (models["z"].path, models["z"].lora) == ("a+b", None)  # an existing folder of that name
    bad = write_project(tmp_path, '[models]\nx = "m+l+k"\n[method]\nname = "linear"\n', name="bad.toml")
    assert_one_line_error(run("validate", bad), "bad.toml: [models.x] path: 'm+l+k' must be 'model+adapter'")


def _project(tmp_path, base, adapter, extra=""):
    return write_project(tmp_path, f'[models]\nm = {{ path = "{base}", lora = "{adapter}"{extra} }}\n'
                                   '[method]\nname = "passthrough"\n[output]\npath = "out"\n')


def _edit_config(adapter: Path, **changes) -> None:
    settings = json.loads((adapter / "adapter_config.json").read_text())
    settings.update(changes)
    (adapter / "adapter_config.json").write_text(json.dumps(settings))


@pytest.fixture(scope="module")
def plain_adapter(tmp_path_factory, llama_family):
    return make_adapter(llama_family["base"], tmp_path_factory.mktemp("adapter") / "a", target_modules=["q_proj"])


@pytest.mark.parametrize("change, fragments", [
    ({"use_dora": True}, ["adapter_config.json: use_dora = true (DoRA) is not supported"]),
    ({"peft_type": "LOHA"}, ["adapter_config.json: peft_type 'LOHA' is not supported"]),
    ({"r": 8}, ["module 'model.layers.0.self_attn.q_proj' has rank 4 (lora_A) and 4 (lora_B) but",
                "gives r = 8"]),
    ({"rank_pattern": {"q_proj": 2}}, ["gives r = 2 (r / rank_pattern)"]),
])
def test_bad_adapter_config_is_one_line_and_writes_nothing(change, fragments, tmp_path, llama_family, plain_adapter):
    adapter = shutil.copytree(plain_adapter, tmp_path / "adapter")
    _edit_config(adapter, **change)
    assert_one_line_error(run("merge", _project(tmp_path, llama_family["base"], adapter)), *fragments)
    assert not (tmp_path / "out").exists()
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_adapter_for_another_model_names_the_missing_tensor(tmp_path, llama_family):
    torch.manual_seed(7)
    other = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=52)).save_pretrained(other)
    adapter = make_adapter(other, tmp_path / "adapter", target_modules=["c_attn"], fan_in_fan_out=True)
    assert_one_line_error(run("merge", _project(tmp_path, llama_family["base"], adapter)),
                          "adapter module 'transformer.h.0.attn.c_attn' has no tensor "
                          "'transformer.h.0.attn.c_attn.weight' in the base model")


def test_missing_adapter_and_explicit_pretrained_loader_are_errors(tmp_path, llama_family, plain_adapter):
    assert_one_line_error(run("merge", _project(tmp_path, llama_family["base"], tmp_path / "nowhere")),
                          "[models.m] lora: path", "does not exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(run("merge", _project(tmp_path, llama_family["base"], empty)),
                          f"{empty} has no adapter_config.json")
    assert_one_line_error(run("merge", _project(tmp_path, llama_family["base"], plain_adapter, ', loader = "pretrained"')),
                          "loader 'pretrained' cannot apply lora")
    assert not (tmp_path / "out").exists()


def test_lora_loader_is_registered():
    registry = get_registry()
    assert "lora" in registry.loaders
    assert registry.provider[("loader", "lora")].package == "mixcli-lora"


def test_the_adapter_folder_is_never_written_over(tmp_path, llama_family, plain_adapter):
    adapter = shutil.copytree(plain_adapter, tmp_path / "adapter")
    before = sorted(p.name for p in adapter.iterdir())
    project = write_project(tmp_path, f'[models]\nm = {{ path = "{llama_family["base"]}", lora = "adapter" }}\n'
                                      '[method]\nname = "passthrough"\n[output]\npath = "adapter"\n')
    assert_one_line_error(run("merge", project, "--force"), "is the adapter folder of model 'm'")
    assert sorted(p.name for p in adapter.iterdir()) == before


@pytest.mark.parametrize("form", ["plus", "table"])
def test_mergekit_recipe_with_model_plus_lora_imports_and_merges_like_peft(form, tmp_path, llama_family,
                                                                         plain_adapter, monkeypatch):
    import tomli

    monkeypatch.chdir(tmp_path)
    base = llama_family["base"]
    model = (f"{base}+{plain_adapter}" if form == "plus" else
             f"{{model: {{path: {base}}}, lora: {{path: {plain_adapter}}}}}")
    (tmp_path / "recipe.yml").write_text(f"merge_method: passthrough\nmodels:\n  - model: {model}\n")
    result = run("import-mergekit", "recipe.yml", "--output-path", "merged")
    assert result.exit_code == 0, result.output
    models = tomli.loads((tmp_path / "project.toml").read_text())["models"]
    assert list(models.values()) == [{"path": str(base), "lora": str(plain_adapter)}]
    assert run("merge", "project.toml").exit_code == 0
    reference = peft_merged(base, plain_adapter).state_dict()
    written = tiny_models.load_tensors(tmp_path / "merged")
    assert all(torch.equal(written[k], reference[k]) for k in reference)



def test_an_adapter_that_would_untie_a_tied_head_is_an_error(tmp_path, tied_family):
    adapter = make_adapter(tied_family["base"], tmp_path / "adapter", target_modules=["q_proj"],
                           modules_to_save=["lm_head"])
    assert_one_line_error(run("merge", _project(tmp_path, tied_family["base"], adapter)),
                          "replaces the head 'lm_head.weight' but the base model ties it", "untie the base")
    assert not (tmp_path / "out").exists()
