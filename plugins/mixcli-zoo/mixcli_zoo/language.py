"""Language family: a tiny character-level Llama and algorithmic-task experts.

The base is pretrained (full-sequence LM loss) on a mixture of algorithmic tasks in
which the expert tasks (reverse, sort, shift, nines' complement) appear mostly with SHORT
inputs (1-3 characters), and only a fraction ``p_long`` of the time with the long inputs
(4-6 characters), next to tasks it keeps (copy, length). Experts fine-tune (answer-only
loss, small learning rate, embeddings and output head frozen) on long inputs of one task,
which the base gets mostly wrong, so each task vector sharpens a skill the base half knows
-- the regime in which merges land between the base and the experts (with ``p_long = 0``
every merge stayed at the base's level). Two kinds of experts: all parameters but the
embeddings and head, and MLP-only (parameters whose name contains "mlp.").
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
import torch.nn.functional as F

from .tokenizer import build_char_tokenizer
from .training import seed_everything, train_loop

VERSION = "language-4"  # 4: a validation split per expert task
# Each expert task works on its own characters, as domains do in real corpora (code, maths,
# prose): a token says which task it belongs to, which token-level MoE routers need, and
# task vectors overlap less than when every task reads the same ten letters.
TASK_CHARS = {"rev": "abcdefghij", "sort": "klmnopqrst", "shift": "ABCDEFGHIJ", "comp": "0123456789"}
EXPERT_TASKS = tuple(TASK_CHARS)
PRETRAIN_MIX = ("copy", "len") + EXPERT_TASKS
# Every character of every prompt has its own token, task names included (a tokenizer
# missing some of them reads "rev:" and "len:" as the same <unk> e <unk>).
ALPHABET = "".join(dict.fromkeys("".join(TASK_CHARS.values()) + "0123456789:=+ .\n" + "".join(PRETRAIN_MIX)))


def make_example(task: str, rng: random.Random, long: bool) -> dict:
    """One {"prompt", "answer"} pair; ``long`` picks the expert (harder) length range.

    copy and len (kept by the base, never fine-tuned) draw words from any task's characters.
    """
    if task in ("copy", "len"):
        chars = rng.choice(list(TASK_CHARS.values()))
        word = "".join(rng.choice(chars) for _ in range(rng.randint(1, 6 if task == "copy" else 9)))
        return {"prompt": f"{task}:{word}=", "answer": word if task == "copy" else str(len(word))}
    chars = TASK_CHARS[task]
    lo, hi = (4, 6) if long else (1, 3)
    word = "".join(rng.choice(chars) for _ in range(rng.randint(lo, hi)))
    if task == "rev":
        answer = word[::-1]
    elif task == "sort":
        answer = "".join(sorted(word))
    elif task == "shift":  # each character to the next one, cyclically
        answer = "".join(chars[(chars.index(c) + 1) % len(chars)] for c in word)
    else:  # comp: nines' complement, digit by digit
        answer = "".join(chars[len(chars) - 1 - chars.index(c)] for c in word)
    return {"prompt": f"{task}:{word}=", "answer": answer}


# Experts keep the base's token embeddings and output head, as the vision experts keep its
# patch embeddings and digit head: the skill then lives in the transformer blocks, where
# merges (and MoE experts) can reach it.
EXPERT_FROZEN = ("embed_tokens", "lm_head")


def make_task_split(task: str, n_train: int, n_test: int, seed: int) -> tuple[list, list]:
    """Disjoint train/test sets of long examples (test prompts never seen in training)."""
    rng = random.Random(f"{seed}-{task}")
    test, seen = [], set()
    while len(test) < n_test:
        ex = make_example(task, rng, long=True)
        if ex["prompt"] not in seen:
            seen.add(ex["prompt"])
            test.append(ex)
    train = []
    while len(train) < n_train:
        ex = make_example(task, rng, long=True)
        if ex["prompt"] not in seen:
            train.append(ex)
    return train, test


def make_pretrain(n: int, seed: int, exclude: set, p_long: float = 0.0) -> list[dict]:
    rng = random.Random(f"{seed}-pretrain")
    out = []
    while len(out) < n:
        task = rng.choice(PRETRAIN_MIX)
        ex = make_example(task, rng, long=task in EXPERT_TASKS and rng.random() < p_long)
        if ex["prompt"] not in exclude:
            out.append(ex)
    return out


def make_validation(task: str, n: int, seed: int, exclude: set) -> list[dict]:
    """``n`` distinct long examples of ``task`` whose prompts are in no other split
    (``exclude``: the train, test and pretraining prompts). Drawn from a stream of their own
    after the others, so adding them changes no training data and no trained model."""
    rng = random.Random(f"{seed}-{task}-validation")
    out, seen = [], set(exclude)
    while len(out) < n:
        ex = make_example(task, rng, long=True)
        if ex["prompt"] not in seen:
            seen.add(ex["prompt"])
            out.append(ex)
    return out


SIZES = {
    "full": dict(hidden=96, layers=2, heads=4, mlp=256, pre_steps=1000, pre_lr=3e-3, p_long=0.1,
                 ft_steps=300, ft_lr=3e-4, mlp_lr_mult=2.0, batch=64,
                 n_pre=20000, n_train=2000, n_test=200),
    # quick (`mixcli demo`): narrower, fewer steps and examples, no MLP-only experts (the quick
    # demo runs no project that reads them)
    "quick": dict(hidden=64, layers=2, heads=2, mlp=192, pre_steps=400, pre_lr=5e-3, p_long=0.1,
                  ft_steps=150, ft_lr=1e-3, mlp_lr_mult=2.0, batch=64, mlp_experts=False,
                  n_pre=8000, n_train=1000, n_test=100),
    "tiny": dict(hidden=64, layers=1, heads=2, mlp=128, pre_steps=150, pre_lr=5e-3,
                 ft_steps=60, ft_lr=5e-3, mlp_lr_mult=3.0, batch=64, p_long=0.0,
                 n_pre=3000, n_train=500, n_test=50),
}


def make_config(hp: dict, tok):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tok), hidden_size=hp["hidden"], intermediate_size=hp["mlp"],
        num_hidden_layers=hp["layers"], num_attention_heads=hp["heads"],
        num_key_value_heads=hp["heads"], max_position_embeddings=64,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
        rms_norm_eps=1e-6,
    )


def encode(tok, examples: list[dict], answer_only: bool):
    """Right-padded ids, mask and labels for <s> prompt answer </s>."""
    ids, labels = [], []
    for ex in examples:
        p = tok(ex["prompt"])["input_ids"]  # starts with <s>
        a = tok(ex["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids.append(p + a)
        labels.append(([-100] * len(p) if answer_only else p) + a)
    n = max(map(len, ids))
    pad = tok.pad_token_id
    x = torch.full((len(ids), n), pad, dtype=torch.long)
    y = torch.full((len(ids), n), -100, dtype=torch.long)
    m = torch.zeros((len(ids), n), dtype=torch.long)
    for i, (a, b) in enumerate(zip(ids, labels)):
        x[i, : len(a)] = torch.tensor(a)
        y[i, : len(b)] = torch.tensor(b)
        m[i, : len(a)] = 1
    if not answer_only:
        y[:, 0] = -100  # never predict <s>
    return x, m, y


def lm_loss(model, x, m, y):
    logits = model(input_ids=x, attention_mask=m).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), y[:, 1:].reshape(-1))


def train(model, data, *, steps, lr, batch, gen, only=None, frozen=(), warmup=30, wd=0.0, label="training"):
    """Train all parameters, or only those whose name contains ``only`` (e.g. "mlp."),
    except those whose name contains one of ``frozen``."""
    x, m, y = data
    for n, p in model.named_parameters():
        p.requires_grad_((only is None or only in n) and not any(f in n for f in frozen))
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()

    def loss_fn(idx):
        # trim padding columns of this batch to save compute
        L = int(m[idx].sum(1).max())
        return lm_loss(model, x[idx, :L], m[idx, :L], y[idx, :L])

    last = train_loop(params, loss_fn, len(x), steps=steps, batch_size=batch, lr=lr, gen=gen,
                      warmup=warmup, weight_decay=wd, label=label)
    for p in model.parameters():
        p.requires_grad_(True)
    return last


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def corpus_lines(n: int, seed: int) -> list[str]:
    """Plain-text lines ``prompt+answer`` from the pretraining mix, for perplexity."""
    rng = random.Random(f"{seed}-corpus")
    return [(lambda ex: ex["prompt"] + ex["answer"])(make_example(rng.choice(PRETRAIN_MIX), rng, long=False))
            for _ in range(n)]


def build_language(out: Path, size: str, seed: int, log=print) -> dict:
    """Train and write the language family under ``out``; return its manifest."""
    import time

    from transformers import LlamaForCausalLM

    hp = SIZES[size]
    t_start = time.time()
    gen = seed_everything(seed)
    tok = build_char_tokenizer(ALPHABET)

    data, splits = {}, {}
    for task in EXPERT_TASKS:
        train_rows, test_rows = make_task_split(task, hp["n_train"], hp["n_test"], seed)
        splits[task] = train_rows
        data[task] = {}
        for split, rows in (("train", train_rows), ("test", test_rows)):
            rel = f"data/{task}/{split}.jsonl"
            write_jsonl(out / rel, rows)
            data[task][split] = rel
    held_out = {json.loads(line)["prompt"] for t in EXPERT_TASKS
                for line in (out / data[t]["test"]).read_text().splitlines()}
    pre = make_pretrain(hp["n_pre"], seed, held_out, hp["p_long"])
    write_jsonl(out / "data/pretrain/train.jsonl", pre)
    used = held_out | {ex["prompt"] for ex in pre} | {ex["prompt"] for rows in splits.values() for ex in rows}
    for task in EXPERT_TASKS:  # as many as the test split, for choosing coefficients
        rel = f"data/{task}/validation.jsonl"
        write_jsonl(out / rel, make_validation(task, hp["n_test"], seed, used))
        data[task] = {"train": data[task]["train"], "validation": rel, "test": data[task]["test"]}
    (out / "data/corpus.txt").write_text("\n".join(corpus_lines(200, seed)) + "\n")

    model = LlamaForCausalLM(make_config(hp, tok))
    train(model, encode(tok, pre, answer_only=False), steps=hp["pre_steps"], lr=hp["pre_lr"],
          batch=hp["batch"], gen=gen, wd=0.01, label="language: pretraining the base")
    model.eval()
    model.save_pretrained(out / "base", safe_serialization=True)
    tok.save_pretrained(out / "base")
    base_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    log(f"  language base trained ({time.time() - t_start:.0f}s)")

    members = {"experts": [], "mlp_experts": []}
    kinds = (("experts", None), ("mlp_experts", "mlp.")) if hp.get("mlp_experts", True) else (("experts", None),)
    for kind, only in kinds:
        for task in EXPERT_TASKS:
            model.load_state_dict(base_sd)
            train(model, encode(tok, splits[task], answer_only=True), steps=hp["ft_steps"],
                  lr=hp["ft_lr"] * (hp["mlp_lr_mult"] if only else 1.0), batch=hp["batch"], gen=gen,
                  only=only, frozen=EXPERT_FROZEN, warmup=10,
                  label=f"language: {'MLP-only expert' if only else 'expert'} {task}")
            model.eval()
            folder = f"{kind}/{task}"
            model.save_pretrained(out / folder, safe_serialization=True)
            tok.save_pretrained(out / folder)
            members[kind].append({"task": task, "path": folder})
        log(f"  language {kind.replace('_', ' ')} trained ({time.time() - t_start:.0f}s)")

    return {
        "family": "language",
        "architecture": "LlamaForCausalLM",
        "base": "base",
        "experts": members["experts"],
        "mlp_experts": members["mlp_experts"],
        "data": {**data, "pretrain": {"train": "data/pretrain/train.jsonl"}},
        "corpus": "data/corpus.txt",
        "metric": "greedy exact match of the stripped continuation",
        "hyperparameters": dict(hp),
    }
