"""A second language family, built the way users' experts are: one small character-level
Llama base and four FULL fine-tunes of it (every parameter, embeddings and head included) on
different tasks that share one alphabet, with a hand-built tokenizer that has no template
(it adds no BOS by itself, although the models are trained with BOS first, and the model's
generation config names it). Every prompt ends in "=", as many users' prompt formats do.

It reuses mixcli-zoo's training code (its seeded data order, AdamW with warm-up and cosine
decay, its Llama config) and takes a few minutes on one core:

    PYTHONPATH=plugins/mixcli-zoo python benchmarks/llama_family.py .llama-family

Writes ``base/``, ``experts/<task>/``, ``data/<task>/{train,validation,test}.jsonl`` and a
``manifest.json`` shaped like the zoo's (paths relative to the folder given); an existing
complete build (same version) is reused.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

VERSION = "llama-family-1"
ALPHABET_WORDS = "abcdefgh"
TASKS = ("rot", "dup", "up", "rev")  # rotate left by one, double each letter, upper-case, reverse
SIZES = dict(hidden=64, layers=2, heads=2, mlp=192, pre_steps=500, pre_lr=5e-3, ft_steps=150, ft_lr=1e-3,
             batch=64, n_pre=8000, n_train=1000, n_validation=100, n_test=100)


def answer(task: str, word: str) -> str:
    if task == "rot":
        return word[1:] + word[:1]
    if task == "dup":
        return "".join(c + c for c in word)
    if task == "up":
        return word.upper()
    return word[::-1]


def example(task: str, rng: random.Random, long: bool) -> dict:
    lo, hi = (4, 6) if long else (1, 3)
    word = "".join(rng.choice(ALPHABET_WORDS) for _ in range(rng.randint(lo, hi)))
    return {"prompt": f"{task}:{word}=", "answer": answer(task, word)}


def splits(task: str, seed: int) -> dict:
    """Disjoint train / validation / test sets of long examples."""
    rng = random.Random(f"{seed}-{task}")
    seen, out = set(), {}
    for split, count in (("test", SIZES["n_test"]), ("validation", SIZES["n_validation"]),
                         ("train", SIZES["n_train"])):
        rows = []
        while len(rows) < count:
            row = example(task, rng, long=True)
            if row["prompt"] in seen:
                continue  # validation and test prompts are never trained on, nor shared
            if split != "train":
                seen.add(row["prompt"])
            rows.append(row)
        out[split] = rows
    return out


def tokenizer():
    """One token per character; <pad> <s> </s> <unk> first; NO template (adds no BOS)."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    chars = dict.fromkeys(ALPHABET_WORDS + ALPHABET_WORDS.upper() + "".join(TASKS) + ":=")
    vocab = {tok: i for i, tok in enumerate(("<pad>", "<s>", "</s>", "<unk>"))}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", padding_side="left", clean_up_tokenization_spaces=False)


def encode(tok, rows: list[dict], answer_only: bool):
    """<s> prompt answer </s>, right-padded, as mixcli-zoo's language family trains."""
    import torch

    ids, labels = [], []
    for row in rows:
        prompt = [tok.bos_token_id] + tok(row["prompt"], add_special_tokens=False)["input_ids"]
        reply = tok(row["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids.append(prompt + reply)
        labels.append(([-100] * len(prompt) if answer_only else [-100] + prompt[1:]) + reply)
    width = max(map(len, ids))
    x = torch.full((len(ids), width), tok.pad_token_id, dtype=torch.long)
    y = torch.full((len(ids), width), -100, dtype=torch.long)
    m = torch.zeros((len(ids), width), dtype=torch.long)
    for i, (a, b) in enumerate(zip(ids, labels)):
        x[i, :len(a)], y[i, :len(b)], m[i, :len(a)] = torch.tensor(a), torch.tensor(b), 1
    return x, m, y


def build(out: Path, seed: int = 0, log=print, ft_lr: float | None = None, ft_steps: int | None = None) -> dict:
    from transformers import LlamaForCausalLM

    from mixcli_zoo.language import make_config, train
    from mixcli_zoo.training import seed_everything, set_threads, write_json

    sizes = dict(SIZES, ft_lr=ft_lr or SIZES["ft_lr"], ft_steps=ft_steps or SIZES["ft_steps"])
    manifest_path = out / "manifest.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("version") == VERSION and manifest.get("seed") == seed and (
                (ft_lr is None and ft_steps is None) or manifest.get("hyperparameters") == sizes):
            return manifest
    set_threads(1)
    start = time.time()
    gen = seed_everything(seed)
    tok = tokenizer()
    data = {}
    held = set()
    task_rows = {}
    for task in TASKS:
        task_rows[task] = splits(task, seed)
        data[task] = {}
        for split, rows in task_rows[task].items():
            path = out / "data" / task / f"{split}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
            data[task][split] = str(path.relative_to(out))
            if split != "train":
                held |= {r["prompt"] for r in rows}
    rng = random.Random(f"{seed}-pretrain")
    pre = []
    while len(pre) < SIZES["n_pre"]:  # mostly short inputs, 10 % long ones: the base half knows each task
        row = example(rng.choice(TASKS), rng, long=rng.random() < 0.1)
        if row["prompt"] not in held:
            pre.append(row)
    model = LlamaForCausalLM(make_config(SIZES, tok))
    train(model, encode(tok, pre, answer_only=False), steps=SIZES["pre_steps"], lr=SIZES["pre_lr"],
          batch=SIZES["batch"], gen=gen, wd=0.01, label="llama family: pretraining the base")
    model.eval()
    model.save_pretrained(out / "base")
    tok.save_pretrained(out / "base")
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    log(f"  base trained ({time.time() - start:.0f}s)")
    experts = []
    for task in TASKS:
        model.load_state_dict(base_state)
        train(model, encode(tok, task_rows[task]["train"], answer_only=True), steps=sizes["ft_steps"],
              lr=sizes["ft_lr"], batch=SIZES["batch"], gen=gen, warmup=10, label=f"llama family: expert {task}")
        model.eval()
        model.save_pretrained(out / "experts" / task)
        tok.save_pretrained(out / "experts" / task)
        experts.append({"task": task, "path": f"experts/{task}"})
        log(f"  expert {task} trained ({time.time() - start:.0f}s)")
    manifest = {"family": "llama-family", "version": VERSION, "seed": seed, "base": "base", "experts": experts,
                "data": data, "metric": "greedy exact match of the stripped continuation",
                "hyperparameters": sizes, "build_seconds": round(time.time() - start, 1)}
    write_json(manifest_path, manifest)
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ft-lr", type=float, default=None, help=f"experts' learning rate ({SIZES['ft_lr']})")
    parser.add_argument("--ft-steps", type=int, default=None, help=f"experts' steps ({SIZES['ft_steps']})")
    args = parser.parse_args()
    manifest = build(args.out.absolute(), args.seed, ft_lr=args.ft_lr, ft_steps=args.ft_steps)
    print(json.dumps({"build_seconds": manifest["build_seconds"], "experts": [e["task"] for e in manifest["experts"]]}))


if __name__ == "__main__":
    main()
