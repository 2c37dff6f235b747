"""Each evaluator against an expectation computed by hand on a model whose outputs are known."""

import json
import math

import pytest
import torch
import transformers
from click.testing import CliRunner
from safetensors.torch import save_file

import tiny_models
from conftest import write_project
from mixcli.cli import cli
from mixcli.plugins import get_registry


def evaluate(name, folder, **settings):
    from mixcli.evaluation import run_evaluator

    return run_evaluator(get_registry().evaluators[name], folder, settings, f"test {name}",
                         base_dir=folder.parent)


@pytest.fixture(scope="module")
def uniform_llama(tmp_path_factory):
    """A Llama whose logits are all zero: every next token has probability 1/V."""
    model = transformers.LlamaForCausalLM(tiny_models.config()).eval()
    with torch.no_grad():
        model.model.norm.weight.zero_()
    return tiny_models.save(model, tmp_path_factory.mktemp("uniform") / "model")


def test_parameters_of_a_dense_model(llama_family):
    model = transformers.AutoModelForCausalLM.from_pretrained(llama_family["base"])
    total = sum(p.numel() for p in model.parameters())
    assert evaluate("parameters", llama_family["base"]) == {"total": total, "active": total}


def test_parameters_of_a_mixtral_count_active_experts(tmp_path):
    config = transformers.MixtralConfig(vocab_size=52, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                        num_experts_per_tok=2)
    model = transformers.MixtralForCausalLM(config)
    model.save_pretrained(tmp_path / "moe")
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert experts > 0
    got = evaluate("parameters", tmp_path / "moe")
    assert got == {"total": total, "active": total - experts + experts * 2 // 4}


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size(uniform_llama, tmp_path):
    (tmp_path / "text.txt").write_text("12+34=46\nabc cba\nhello world\n")
    got = evaluate("perplexity", uniform_llama, data=str(tmp_path / "text.txt"))
    vocab = transformers.AutoConfig.from_pretrained(uniform_llama).vocab_size
    assert got["loss"] == pytest.approx(math.log(vocab), rel=1e-6)
    assert got["perplexity"] == pytest.approx(vocab, rel=1e-5)


def test_exact_match_counts_greedy_answers(uniform_llama, tmp_path):
    # zero logits: greedy picks id 0 (<pad>) every step, which decodes to the empty string
    rows = [{"prompt": "1+1=", "answer": ""}, {"prompt": "2+2=", "answer": "4"},
            {"prompt": "abc", "answer": ""}, {"prompt": "x", "answer": " "}]
    (tmp_path / "qa.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "other.jsonl").write_text(json.dumps({"prompt": "q", "answer": "7"}) + "\n")
    got = evaluate("exact_match", uniform_llama, tasks={"qa": str(tmp_path / "qa.jsonl"),
                                                         "other": str(tmp_path / "other.jsonl")},
                   max_new_tokens=3)
    assert got == {"qa": 0.75, "other": 0.0, "mean": 0.375}


def test_classification_uses_each_tasks_head(tmp_path):
    config = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16,
                                    num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    transformers.ViTModel(config).save_pretrained(tmp_path / "backbone")
    labels = [0, 1, 2, 2, 1, 2, 0, 2]
    for task, favourite in (("twos", 2), ("ones", 1)):
        folder = tmp_path / task
        folder.mkdir()
        bias = torch.zeros(3)
        bias[favourite] = 5.0  # the head ignores the features and always answers `favourite`
        save_file({"weight": torch.zeros(3, 16), "bias": bias}, folder / "head.safetensors")
        (folder / "test.jsonl").write_text("\n".join(
            json.dumps({"pixel_values": [[float(i)] * 8] * 8, "label": y}) for i, y in enumerate(labels)))
        (folder / "task.json").write_text(json.dumps({"task": task, "data": "test.jsonl"}))
    got = evaluate("classification", tmp_path / "backbone", tasks=[str(tmp_path / "twos"), str(tmp_path / "ones")])
    assert got == {"twos": 4 / 8, "ones": 2 / 8, "mean": 3 / 8}


def test_evaluation_section_runs_after_merge_and_eval_command(uniform_llama, tmp_path):
    (tmp_path / "text.txt").write_text("hello\n")
    project = write_project(tmp_path, f"""
[models]
a = {{ path = "{uniform_llama}", weight = 1.0 }}
[method]
name = "linear"
[output]
path = "out"
[[evaluation]]
evaluator = "perplexity"
data = "text.txt"
[[evaluation]]
evaluator = "parameters"
""")
    result = CliRunner().invoke(cli, ["merge", str(project)])
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "out.eval.json").read_text())
    assert [r["evaluator"] for r in rows] == ["perplexity", "parameters"]
    assert rows[0]["metrics"]["perplexity"] == pytest.approx(52, rel=1e-5)
    again = CliRunner().invoke(cli, ["eval", str(tmp_path / "out"), "--evaluator", "perplexity",
                                     "--param", f"data={json.dumps(str(tmp_path / 'text.txt'))}"])
    assert again.exit_code == 0, again.output
    assert "perplexity" in again.output and "52.0000" in again.output


def test_evaluator_mistakes_are_one_line_errors(uniform_llama, tmp_path):
    project = write_project(tmp_path, f"""
[models]
a = "{uniform_llama}"
[method]
name = "linear"
weight = 1.0
[[evaluation]]
evaluator = "perplexty"
""")
    result = CliRunner().invoke(cli, ["validate", str(project)])
    assert result.exit_code == 1
    assert "unknown evaluator 'perplexty' (did you mean 'perplexity'?)" in result.output
    project.write_text(project.read_text().replace("perplexty", "perplexity"))
    result = CliRunner().invoke(cli, ["validate", str(project)])
    assert result.exit_code == 1 and "evaluator 'perplexity' needs 'data'" in result.output
    missing = CliRunner().invoke(cli, ["eval", str(uniform_llama), "--evaluator", "perplexity",
                                       "--param", "data='nope.txt'"])
    assert missing.exit_code == 1 and "data file" in missing.output and "does not exist" in missing.output
    unset = CliRunner().invoke(cli, ["eval", str(uniform_llama), "--evaluator", "perplexity"])
    assert unset.exit_code == 1 and unset.output.startswith(
        "Error: --evaluator perplexity: evaluator 'perplexity' needs 'data' (text data: ")
    assert unset.output.rstrip().endswith("give it with --param data=VALUE") and "tensor" not in unset.output


def vit_task(folder, hidden=16):
    folder.mkdir()
    save_file({"weight": torch.zeros(3, hidden), "bias": torch.tensor([0.0, 0.0, 1.0])}, folder / "head.safetensors")
    (folder / "test.jsonl").write_text(json.dumps({"pixel_values": [[0.5] * 8] * 8, "label": 2}) + "\n")
    (folder / "task.json").write_text(json.dumps({"task": folder.name, "data": "test.jsonl"}))
    return folder


def eval_cli(*args):
    result = CliRunner().invoke(cli, ["eval", *[str(a) for a in args]])
    assert "Traceback" not in result.output
    return result


def test_classification_of_a_vit_saved_without_its_pooler_reads_the_first_token(tmp_path):
    config = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16,
                                    num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    torch.manual_seed(0)
    model = transformers.ViTModel(config, add_pooling_layer=False).eval()
    model.save_pretrained(tmp_path / "nopool")
    task = vit_task(tmp_path / "task")
    # a head on the first token: class 2 where its first feature is positive, else class 0
    weight = torch.zeros(3, 16)
    weight[2, 0] = 1.0
    images = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        first = model(pixel_values=images).last_hidden_state[:, 0, 0]
    labels = [2] * 3 + [0] * 3
    expected = sum((2 if f > 0 else 0) == y for f, y in zip(first.tolist(), labels)) / 6
    save_file({"weight": weight, "bias": torch.zeros(3)}, task / "head.safetensors")
    (task / "test.jsonl").write_text("".join(json.dumps({"pixel_values": x.flatten().tolist(), "label": y}) + "\n"
                                             for x, y in zip(images, labels)))
    assert 0 < expected < 1
    assert evaluate("classification", tmp_path / "nopool", tasks=[str(task)]) == {"task": expected, "mean": expected}
    # a task that names the pooler output cannot be read from it: one line, nothing written
    (task / "task.json").write_text(json.dumps({"task": "task", "data": "test.jsonl", "feature": "pooler_output"}))
    result = eval_cli(tmp_path / "nopool", "--evaluator", "classification", "--param", f'tasks=["{task}"]')
    assert result.exit_code == 1
    assert result.output.strip() == (
        "Error: classification: task 'task': the task reads the pooler output (\"feature\": \"pooler_output\" in "
        "task.json), but the backbone has no pooler; set \"feature\" to \"cls\" or \"mean\"")
    assert not (tmp_path / "nopool.eval.json").exists()


def test_eval_of_what_is_not_a_loadable_model_is_one_line(tmp_path, uniform_llama):
    (tmp_path / "text.txt").write_text("hello\n")
    data = f"data={json.dumps(str(tmp_path / 'text.txt'))}"
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not a model")
    config_only = tmp_path / "config_only"
    transformers.AutoConfig.from_pretrained(uniform_llama).save_pretrained(config_only)
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "config.json").write_text(json.dumps({"model_type": "fancy_lm", "auto_map": {
        "AutoConfig": "configuration_fancy.FancyConfig", "AutoModelForCausalLM": "modeling_fancy.FancyLM"}}))
    save_file({"w": torch.zeros(2)}, remote / "model.safetensors")
    cases = [
        (tmp_path / "notes", "perplexity", f"{tmp_path / 'notes'}: not a model folder (no config.json); give a "
                                           "folder written by save_pretrained or mixcli merge"),
        (config_only, "perplexity", f"{config_only}: has a config.json but no weights (no *.safetensors or "
                                    "pytorch_model.bin); give the folder the whole model was saved to"),
        (remote, "perplexity", f"{remote}: model type 'fancy_lm' needs the Python code shipped with the model "
                               "(auto_map in config.json), which mixcli does not run; use a model of a "
                               "transformers architecture or a mixcli plugin that provides this one"),
        (config_only, "parameters", f"{config_only}: has a config.json but no weights (no *.safetensors or "
                                    "pytorch_model.bin); give the folder the whole model was saved to"),
    ]
    for folder, evaluator, message in cases:
        result = eval_cli(folder, "--evaluator", evaluator, "--param", data) if evaluator == "perplexity" \
            else eval_cli(folder, "--evaluator", evaluator)
        assert result.exit_code == 1, result.output
        assert result.output.strip() == f"Error: {message}"


def test_classification_task_mistakes_are_one_line(tmp_path):
    config = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16,
                                    num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    transformers.ViTModel(config).save_pretrained(tmp_path / "vit")
    wide = vit_task(tmp_path / "wide", hidden=24)
    result = eval_cli(tmp_path / "vit", "--evaluator", "classification", "--param", f'tasks=["{wide}"]')
    assert result.exit_code == 1 and result.output.strip() == (
        "Error: classification: task 'wide': head weight [3, 24] and bias [3] do not fit the model's hidden size 16")
    broken = vit_task(tmp_path / "broken")
    (broken / "task.json").write_text("{not json")
    result = eval_cli(tmp_path / "vit", "--evaluator", "classification", "--param", f'tasks=["{broken}"]')
    assert result.exit_code == 1 and result.output.startswith(
        f"Error: classification: {broken / 'task.json'} cannot be read as JSON")


def test_classification_split_picks_the_data_of_task_json(tmp_path):
    config = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16,
                                    num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    transformers.ViTModel(config).save_pretrained(tmp_path / "backbone")
    folder = tmp_path / "twos"
    folder.mkdir()
    bias = torch.zeros(3)
    bias[2] = 5.0  # always answers 2: the accuracy is the share of 2s in the split read
    save_file({"weight": torch.zeros(3, 16), "bias": bias}, folder / "head.safetensors")
    for split, labels in (("test", [2, 2, 0, 1]), ("validation", [2, 0, 0, 0, 1])):
        (folder / f"{split}.jsonl").write_text("\n".join(
            json.dumps({"pixel_values": [[0.5] * 8] * 8, "label": y}) for y in labels))
    (folder / "task.json").write_text(json.dumps({"task": "twos", "data": {"test": "test.jsonl",
                                                                           "validation": "validation.jsonl"}}))
    assert evaluate("classification", tmp_path / "backbone", tasks=[str(folder)])["twos"] == 2 / 4
    assert evaluate("classification", tmp_path / "backbone", tasks=[str(folder)], split="validation")["twos"] == 1 / 5
    result = eval_cli(tmp_path / "backbone", "--evaluator", "classification", "--param", f'tasks=["{folder}"]',
                      "--param", 'split="train"')
    assert result.exit_code == 1 and result.output.strip() == (
        f"Error: classification: task 'twos': {folder / 'task.json'} has no 'train' data (splits: test, "
        "validation); set split to one of them")
    (folder / "task.json").write_text(json.dumps({"task": "twos", "data": "test.jsonl"}))
    result = eval_cli(tmp_path / "backbone", "--evaluator", "classification", "--param", f'tasks=["{folder}"]',
                      "--param", 'split="validation"')
    assert result.exit_code == 1 and result.output.strip() == (
        f"Error: classification: task 'twos': {folder / 'task.json'} names one data file, read as the test "
        'split; for split = "validation" give "data" as a table {"validation": file, ...}')
