"""Vocabulary alignment: embeddings and heads of models with different tokenizers are
re-indexed into one output vocabulary before merging, checked against references built here
by hand from the input tensors."""

import json

import pytest
import torch
import transformers
from click.testing import CliRunner

import tiny_models
from conftest import write_project
from mixcli.cli import cli
from mixcli_zoo.tokenizer import build_char_tokenizer

EXTRA = ["<|im_start|>", "<|im_end|>"]
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
N = len(tiny_models.tokenizer())  # the base vocabulary


def save(model, tokenizer, folder):
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """base; ft (a fine-tune); perm (ft with the alphabet numbered backwards, rows permuted to
    match); chat (ft with two added special tokens and rows for them); padded (base with 8
    reserved rows beyond its tokenizer)."""
    root = tmp_path_factory.mktemp("vocab")
    torch.manual_seed(7)
    tok = tiny_models.tokenizer()
    cfg = tiny_models.config("llama", layers=2)
    base = transformers.LlamaForCausalLM(cfg).eval()
    ft = transformers.LlamaForCausalLM(cfg).eval()
    ft.load_state_dict(base.state_dict())
    with torch.no_grad():
        for param in ft.parameters():
            param.add_(0.05 * torch.randn_like(param))
    paths = {"base": save(base, tok, root / "base"), "ft": save(ft, tok, root / "ft")}

    reversed_tok = build_char_tokenizer(tiny_models.ALPHABET[::-1])
    vocab_a, vocab_p = tok.get_vocab(), reversed_tok.get_vocab()
    order = [vocab_a[t] for t in sorted(vocab_p, key=vocab_p.get)]  # perm row i = ft row order[i]
    perm = transformers.LlamaForCausalLM(cfg).eval()
    state = {k: v.clone() for k, v in ft.state_dict().items()}
    for name in (EMBED, HEAD):
        state[name] = state[name][order]
    perm.load_state_dict(state)
    paths["perm"] = save(perm, reversed_tok, root / "perm")

    chat_tok = tiny_models.tokenizer()
    chat_tok.add_special_tokens({"additional_special_tokens": EXTRA})
    chat = transformers.LlamaForCausalLM(cfg).eval()
    chat.load_state_dict(ft.state_dict())
    chat.resize_token_embeddings(len(chat_tok), mean_resizing=False)
    with torch.no_grad():
        for name in (EMBED, HEAD):
            weight = dict(chat.named_parameters())[name]
            weight[-2:] = torch.stack([torch.full((cfg.hidden_size,), 1.0), torch.full((cfg.hidden_size,), 2.0)])
    paths["chat"] = save(chat, chat_tok, root / "chat")

    padded = transformers.LlamaForCausalLM(tiny_models.config("llama", layers=2, vocab=len(tok) + 8)).eval()
    pstate = padded.state_dict()
    for name, value in base.state_dict().items():
        if name in (EMBED, HEAD):
            pstate[name][: len(tok)] = value
        else:
            pstate[name] = value
    padded.load_state_dict(pstate)
    paths["padded"] = save(padded, tok, root / "padded")
    return paths


def merge(tmp_path, families, models, method, extra="", expect=0):
    lines = "\n".join(f'{name} = "{families[path]}"' for name, path in models.items())
    project = write_project(tmp_path, f"""
[models]
{lines}
[method]
name = "{method}"
{extra}
[output]
path = "out"
""")
    result = CliRunner().invoke(cli, ["merge", str(project)])
    assert result.exit_code == expect, result.output
    return result


def tensors(folder):
    return tiny_models.load_tensors(folder)


def test_different_vocabularies_without_a_tokenizer_table_are_one_line_errors(tmp_path, families):
    result = merge(tmp_path, families, {"base": "base", "perm": "perm"}, "linear", "weight = 0.5", expect=1)
    assert result.output.strip().splitlines()[-1].startswith(
        "Error: project.toml: [models]: models 'base' and 'perm' have different vocabularies (token ")
    assert result.output.strip().endswith("add a [tokenizer] table (source = \"union\", \"base\" or "
                                          "\"model:NAME\") to align the vocabularies")
    result = merge(tmp_path, families, {"base": "base", "chat": "chat"}, "linear", "weight = 0.5", expect=1)
    assert (f"models 'base' and 'chat' have vocabularies of different size ({N} and {N + 2} embedding rows)"
            in result.output)
    assert not (tmp_path / "out").exists()


def test_a_permuted_vocabulary_merges_as_if_it_were_not(tmp_path, families):
    merge(tmp_path, families, {"base": "base", "perm": "perm"}, "linear",
          'weight = 0.5\n[tokenizer]\nsource = "base"')
    merged = tensors(tmp_path / "out")
    base, ft = tensors(families["base"]), tensors(families["ft"])
    for name, value in merged.items():  # perm is ft with its rows renumbered: the merge is base/ft's
        torch.testing.assert_close(value, (base[name] + ft[name]) / 2, rtol=0, atol=1e-6)
    reference = transformers.LlamaForCausalLM(tiny_models.config("llama", layers=2)).eval()
    reference.load_state_dict({k: (base[k] + ft[k]) / 2 for k in base})
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    ids = tok("abc 12+3=", return_tensors="pt").input_ids
    assert ids.tolist() == tiny_models.tokenizer()("abc 12+3=", return_tensors="pt").input_ids.tolist()
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)


def test_union_adds_the_chat_tokens_with_their_rows(tmp_path, families):
    result = merge(tmp_path, families, {"base": "base", "chat": "chat"}, "linear",
                   'weight = 0.5\n[tokenizer]\nsource = "union"')
    assert "model 'base' lacks 2 token(s) of the output: '<|im_start|>', '<|im_end|>'" in result.output
    merged, base, chat = tensors(tmp_path / "out"), tensors(families["base"]), tensors(families["chat"])
    n = N
    for name in (EMBED, HEAD):
        assert merged[name].shape[0] == N + 2
        torch.testing.assert_close(merged[name][:n], (base[name] + chat[name][:n]) / 2, rtol=0, atol=1e-6)
        assert torch.equal(merged[name][n:], chat[name][n:])  # only chat has them: its rows for both
    config = json.loads((tmp_path / "out/config.json").read_text())
    assert config["vocab_size"] == N + 2
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tok.convert_tokens_to_ids(EXTRA) == [N, N + 1]
    assert tok("<|im_start|>ab").input_ids == [1, N] + tiny_models.tokenizer()("ab").input_ids[1:]
    card = (tmp_path / "out/README.md").read_text()
    assert "model 'base' lacks 2 token(s)" in card
    tiny_models.logits(tmp_path / "out", "<|im_start|>ab<|im_end|>")


def test_padding_rows_are_each_models_mean_and_the_config_follows(tmp_path, families):
    merge(tmp_path, families, {"base": "base", "chat": "chat"}, "linear",
          'weight = 0.5\n[tokenizer]\nsource = "union"\npad_to_multiple_of = 16')
    merged, base, chat = tensors(tmp_path / "out"), tensors(families["base"]), tensors(families["chat"])
    for name in (EMBED, HEAD):
        assert merged[name].shape[0] == 64
        aligned_base = torch.cat([base[name], chat[name][N:]])  # base's missing rows come from chat
        pad_base, pad_chat = aligned_base.mean(0), chat[name].mean(0)
        expected = (pad_base + pad_chat) / 2
        torch.testing.assert_close(merged[name][N + 2:], expected.expand(64 - N - 2, -1), rtol=0, atol=1e-6)
    assert json.loads((tmp_path / "out/config.json").read_text())["vocab_size"] == 64


def test_forced_model_token_and_zero_entries(tmp_path, families):
    merge(tmp_path, families, {"base": "base", "chat": "chat"}, "linear", '''weight = 0.5
[tokenizer]
source = "union"
[tokenizer.tokens]
"<|im_start|>" = { source = { kind = "model_token", model = "chat", token = "<s>" }, force = true }
"<|im_end|>" = { source = "zero" }''')
    merged, chat = tensors(tmp_path / "out"), tensors(families["chat"])
    for name in (EMBED, HEAD):
        # forced for both models: base and chat rows are chat's <s> row, and so is the merge
        torch.testing.assert_close(merged[name][N], chat[name][1], rtol=0, atol=1e-6)
        # zero only where missing: base's row is zeros, chat keeps its own
        torch.testing.assert_close(merged[name][N + 1], chat[name][N + 1] / 2, rtol=0, atol=1e-6)


def test_source_base_keeps_reserved_rows_unless_asked(tmp_path, families):
    merge(tmp_path, families, {"padded": "padded", "ft": "ft"}, "linear",
          'weight = 0.5\n[tokenizer]\nsource = "base"')
    merged, padded, ft = tensors(tmp_path / "out"), tensors(families["padded"]), tensors(families["ft"])
    assert merged[EMBED].shape[0] == N + 8  # the base's row count, not the tokenizer's
    torch.testing.assert_close(merged[EMBED][N:], (padded[EMBED][N:] + ft[EMBED].mean(0)) / 2,
                               rtol=0, atol=1e-6)
    assert json.loads((tmp_path / "out/config.json").read_text())["vocab_size"] == N + 8
    (tmp_path / "project.toml").unlink()
    import shutil

    shutil.rmtree(tmp_path / "out")
    merge(tmp_path, families, {"padded": "padded", "ft": "ft"}, "linear",
          'weight = 0.5\n[tokenizer]\nsource = "base"\nkeep_rows = false')
    assert tensors(tmp_path / "out")[EMBED].shape[0] == N


@pytest.mark.parametrize("table, message", [
    ('[tokenizer]\nsource = "model:nope"',
     "project.toml: [tokenizer] source (\"base\", \"union\" or \"model:NAME\"): no model named 'nope' in [models]"),
    ('[tokenizer]\nsorce = "union"', "project.toml: [tokenizer]: unknown key 'sorce' (did you mean 'source'?)"),
    ('[tokenizer.tokens]\n"<x>" = {}', "project.toml: [tokenizer]: tokens.'<x>': 'source' is missing"),
    ('[tokenizer.tokens]\n"<|im_start|>" = { source = "model:base" }',
     "project.toml: [tokenizer]: tokens.'<|im_start|>': model 'base' has no token '<|im_start|>'"),
    ('[tokenizer]\npad_to_multiple_of = 0', "project.toml: [tokenizer]: pad_to_multiple_of must be a positive "
                                            "integer, got 0"),
])
def test_tokenizer_table_mistakes_are_one_line_errors(tmp_path, families, table, message):
    result = merge(tmp_path, families, {"base": "base", "chat": "chat"}, "linear", "weight = 0.5\n" + table,
                   expect=1)
    assert message in result.output.strip().splitlines()[-1]
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_dry_run_prints_the_vocabulary_and_writes_nothing(tmp_path, families):
    project = write_project(tmp_path, f"""
[models]
base = "{families['base']}"
chat = "{families['chat']}"
[method]
name = "linear"
weight = 0.5
[tokenizer]
source = "union"
[output]
path = "out"
""")
    result = CliRunner().invoke(cli, ["merge", str(project), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert f"vocabulary: {N + 2} tokens, {N + 2} rows ([tokenizer] source = union)" in result.output
    assert not (tmp_path / "out").exists()


def test_a_tokenizer_table_is_refused_for_methods_that_build_an_architecture(tmp_path, families):
    project = write_project(tmp_path, f"""
[models]
base = "{families['base']}"
[method]
name = "depth_upscaling"
layers = ["0:2", "0:2"]
[tokenizer]
source = "base"
[output]
path = "out"
""")
    result = CliRunner().invoke(cli, ["merge", str(project)])
    assert result.exit_code == 1
    assert result.output.strip() == ("Error: project.toml: [tokenizer]: vocabulary alignment applies to "
                                     "tensor-wise merges; method 'depth_upscaling' takes its models' "
                                     "vocabulary as it is")
