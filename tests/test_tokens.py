"""Tokenisation as the model expects it (mixcli/tokens.py), shared by router tuning rows,
router prompts and the exact_match / perplexity evaluators."""

import json

import torch
import transformers

import tiny_models
from mixcli import tokens


def templateless():
    """The tiny char tokenizer without its template: it adds no BOS by itself."""
    tok = tiny_models.tokenizer()
    tok.backend_tokenizer.post_processor = None
    assert tok("ab")["input_ids"] == [tok.convert_tokens_to_ids("a"), tok.convert_tokens_to_ids("b")]
    return tok


def test_bos_comes_from_the_template_or_the_generation_config():
    tok = tiny_models.tokenizer()  # its template adds <s>
    assert tokens.specials(tok) == tokens.Specials(1, 2)
    bare = templateless()
    assert tokens.specials(bare).bos is None  # nothing says the model wants a BOS
    assert tokens.specials(bare, {"bos_token_id": 1}).bos == 1  # the model's generation config does
    assert tokens.specials(bare, transformers.GenerationConfig(bos_token_id=1)).bos == 1
    assert tokens.specials(bare, {"bos_token_id": 7}).bos is None  # not the tokenizer's BOS: no


def test_rows_with_and_without_a_leading_bos_give_the_same_ids():
    for tok, generation in ((tiny_models.tokenizer(), None), (templateless(), {"bos_token_id": 1})):
        marks = tokens.specials(tok, generation)
        plain = [1] + tok("12+34=46", add_special_tokens=False)["input_ids"]
        assert tokens.encode(tok, "12+34=46", marks) == plain
        assert tokens.encode(tok, "<s>12+34=46", marks) == plain
        assert tokens.encode(tok, "12+34=46", marks, eos=True) == plain + [2]
        assert tokens.encode(tok, "<s>12+34=46</s>", marks, eos=True) == plain + [2]
        assert tokens.encode(tok, "12+34=46", marks, eos=True, max_length=3) == plain[:3]
        batch = tokens.batch(tok, ["1+1=", "<s>12+34="], marks, left=True)
        assert batch["input_ids"][0].tolist()[-5:] == [1] + tok("1+1=", add_special_tokens=False)["input_ids"]
        assert batch["attention_mask"].tolist() == [[0, 0, 1, 1, 1, 1, 1], [1] * 7]


def test_tune_rows_get_one_bos_and_odd_rows_are_named(tmp_path, capsys):
    from mixcli_moe._train import load_texts, tokenize
    from mixcli_moe.tune import TuneSettings

    rows = [{"prompt": "12+34=", "answer": "46"}, {"prompt": "<s>12+34=", "answer": "46"},
            {"prompt": "9-3=", "answer": "6\u00e9"}, {"prompt": "1+1=</s>", "answer": "2"}]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    settings = TuneSettings(data="rows.jsonl")
    found = load_texts(settings, tmp_path)
    for tok, generation in ((tiny_models.tokenizer(), None), (templateless(), {"bos_token_id": 1})):
        sequences = tokenize(tok, found, settings, generation)
        want = [1] + tok("12+34=46", add_special_tokens=False)["input_ids"] + [2]
        assert sequences[0] == sequences[1] == (want, 7)  # answer-only by default: loss from the answer on
        warning = " ".join(capsys.readouterr().err.split())
        assert "warning: [tune] data: 2 of 4 rows are tokenised differently from the model's training text" in warning
        assert "rows.jsonl row 3 '9-3=6é': characters the tokenizer does not know (read as its unknown token): 'é'" \
            in warning
        assert "rows.jsonl row 4 '1+1=</s>2': a special token's text inside the row ('</s>')" in warning


def test_exact_match_prompts_get_the_bos_the_model_was_trained_with(tmp_path):
    from mixcli_eval.metrics import exact_match, mean_token_loss

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_models.config("llama", 2)).eval()
    prompts = ["12+34=", "5*5=", "abc:"]
    answers = []
    tok = tiny_models.tokenizer()
    for prompt in prompts:  # the greedy continuation after <s> prompt, computed one prompt at a time
        ids = torch.tensor([[1] + tok(prompt, add_special_tokens=False)["input_ids"]])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                             pad_token_id=0, eos_token_id=2)
        answers.append(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    bare = templateless()
    assert model.generation_config.bos_token_id == 1
    assert exact_match(model, tok, prompts, answers, max_new_tokens=4) == 1.0
    assert exact_match(model, bare, prompts, answers, max_new_tokens=4) == 1.0
    assert exact_match(model, bare, ["<s>" + p for p in prompts], answers, max_new_tokens=4) == 1.0
    texts = ["12+34=46", "abc:cba"]
    assert mean_token_loss(model, bare, texts) == mean_token_loss(model, tok, ["<s>" + t for t in texts])


def test_a_folder_without_generation_config_gets_the_same_bos_in_tune_routers_and_evaluators(tmp_path):
    """transformers builds the generation config from config.json's bos/eos when the folder has no
    generation_config.json; tuning rows and router prompts read the folder the same way."""
    from types import SimpleNamespace

    from mixcli_eval.metrics import mean_token_loss
    from mixcli_moe._train import load_texts, tokenize
    from mixcli_moe.routers import specials_of
    from mixcli_moe.tune import TuneSettings

    torch.manual_seed(0)
    folder = tmp_path / "model"
    transformers.LlamaForCausalLM(tiny_models.config("llama", 2)).save_pretrained(folder)
    templateless().save_pretrained(folder)
    (folder / "generation_config.json").unlink()
    assert json.loads((folder / "config.json").read_text())["bos_token_id"] == 1
    bare = transformers.AutoTokenizer.from_pretrained(folder)
    assert bare("ab")["input_ids"][0] != 1  # the saved tokenizer adds no BOS by itself
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    assert model.generation_config.bos_token_id == 1  # what transformers (and generate) use
    assert specials_of(SimpleNamespace(path=folder, name="base"), bare) == tokens.Specials(1, 2)
    assert tokens.generation_settings(folder) == {"bos_token_id": 1, "eos_token_id": 2}
    assert tokens.model_specials(bare, model) == tokens.Specials(1, 2)
    (tmp_path / "rows.jsonl").write_text(json.dumps({"text": "12+34=46"}) + "\n" + json.dumps({"text": "ab"}) + "\n")
    settings = TuneSettings(data="rows.jsonl")
    sequences = tokenize(bare, load_texts(settings, tmp_path), settings, tokens.generation_settings(folder))
    assert sequences[0][0] == [1] + bare("12+34=46", add_special_tokens=False)["input_ids"] + [2]
    # the evaluator reads the text with the same BOS the tuning rows had
    assert mean_token_loss(model, bare, ["12+34=46"]) == mean_token_loss(model, bare, ["<s>12+34=46"])
    ids = torch.tensor([sequences[0][0][:-1]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1]
    want = float(torch.nn.functional.cross_entropy(logits, ids[0, 1:]))
    assert abs(mean_token_loss(model, bare, ["12+34=46"]) - want) < 1e-5


def test_max_length_names_the_rows_it_drops_and_the_answers_it_cuts(tmp_path, capsys):
    from mixcli_moe._train import load_texts, tokenize
    from mixcli_moe.tune import TuneSettings

    rows = [{"prompt": "1+1=", "answer": "2"},        # <s> + 5 + </s> = 7 tokens: fits in 8
            {"prompt": "1234567=", "answer": "8"},    # the prompt alone is <s> + 8 = 9 tokens: dropped
            {"prompt": "12+3=", "answer": "45"},      # 9 tokens: cut to 8, the answer loses its EOS
            {"prompt": "9-3=", "answer": "6"}]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    settings = TuneSettings(data="rows.jsonl", max_length=8)
    tok = tiny_models.tokenizer()
    sequences = tokenize(tok, load_texts(settings, tmp_path), settings)
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert sequences == [([1] + ids("1+1=2") + [2], 5), ([1] + ids("12+3=45"), 6), ([1] + ids("9-3=6") + [2], 5)]
    warning = " ".join(capsys.readouterr().err.split())
    assert warning.count("warning:") == 1
    assert ("warning: [tune] data: max_length = 8: 1 of 4 rows dropped, their prompt alone has 8 tokens or more: "
            "rows.jsonl row 2; 1 of 4 rows cut to 8 tokens, their answer (or text) loses its end and EOS: "
            "rows.jsonl row 3") in warning
    settings = TuneSettings(data="rows.jsonl", max_length=16)
    tokenize(tok, load_texts(settings, tmp_path), settings)
    assert "max_length" not in capsys.readouterr().err


def bpe_tokenizer():
    """A small byte-level BPE tokenizer trained here (tokenizers library, nothing downloaded)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(["hello world", "say hi there", "Q: say hi", "hello hello world"] * 50, trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")


def test_answer_only_loss_covers_exactly_the_answer_tokens_across_a_merged_seam(tmp_path):
    from mixcli_moe._train import batch_tensors, load_texts, tokenize
    from mixcli_moe.tune import TuneSettings

    tok = bpe_tokenizer()
    backend = tok.backend_tokenizer
    pairs = [("hel", "lo world"), ("Q: say ", "hi there"), ("hello", " world")]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in pairs))
    settings = TuneSettings(data="rows.jsonl")
    marks = tokens.Specials(tok.bos_token_id, tok.eos_token_id)
    sequences = tokenize(tok, load_texts(settings, tmp_path), settings, {"bos_token_id": tok.bos_token_id})
    _, _, labels = batch_tensors(sequences, 0)
    merged = 0
    for (prompt, answer), (seq, _), row in zip(pairs, sequences, labels):
        encoding = backend.encode(prompt + answer, add_special_tokens=False)
        # the answer's tokens: those whose bytes include a character of the answer
        answer_tokens = [i for i, (_, end) in enumerate(encoding.offsets) if end > len(prompt)]
        assert seq == [tok.bos_token_id] + encoding.ids + [tok.eos_token_id]
        want = [-100] * (1 + answer_tokens[0]) + encoding.ids[answer_tokens[0]:] + [tok.eos_token_id]
        assert row[:len(seq)].tolist() == want, (prompt, answer, encoding.tokens)
        assert tok.decode(encoding.ids[answer_tokens[0]:]).endswith(answer)
        merged += len(backend.encode(prompt, add_special_tokens=False).ids) != answer_tokens[0]
    assert merged == 2  # 'hel'+'lo' and the trailing space merge across the seam; 'hello'+' world' does not
    assert tokens.encode_answer(tok, "hel", "lo world", marks)[1] == 1


class PairTokenizer(transformers.PythonBackend):
    """A slow (Python) tokenizer that reads 'lo' as one token and every other character alone."""

    def __init__(self, **kwargs):
        self.vocab = {t: i for i, t in enumerate(["<s>", "</s>", "lo", *"helowrd "])}
        super().__init__(bos_token="<s>", eos_token="</s>", **kwargs)

    @property
    def vocab_size(self):
        return len(self.vocab)

    def get_vocab(self):
        return dict(self.vocab)

    def _tokenize(self, text, **kwargs):
        out, i = [], 0
        while i < len(text):
            step = 2 if text[i:i + 2] == "lo" else 1
            out.append(text[i:i + step])
            i += step
        return out

    def _convert_token_to_id(self, token):
        return self.vocab[token]

    def _convert_id_to_token(self, index):
        return {v: k for k, v in self.vocab.items()}[index]


def test_a_slow_tokenizer_encodes_prompt_and_answer_apart():
    tok = PairTokenizer()
    assert not tok.is_fast
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert ids("hel") == [3, 4, 5] and ids("lo world")[0] == 2  # 'hel' + 'lo': the seam is kept
    seq, start = tokens.encode_answer(tok, "hel", "lo world", tokens.Specials(0, 1))
    assert seq == [0] + ids("hel") + ids("lo world") + [1] and start == 4
    assert "".join(tok.convert_ids_to_tokens(seq[start:-1])) == "lo world"
