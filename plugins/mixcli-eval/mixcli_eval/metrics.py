"""Plain metric functions: no project files, no zoo, just models and tensors."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch


@torch.no_grad()
def classification_accuracy(
    backbone,
    head_weight: torch.Tensor,
    head_bias: torch.Tensor,
    pixel_values: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = 256,
    advance: Callable[[int], None] | None = None,
    feature: str | None = None,
    where: str = "classification",
) -> float:
    """Accuracy of ``features(backbone(x)) @ head_weight.T + head_bias`` on ``labels``, the
    features named by ``feature`` (:func:`mixcli.features.head_features`; None: the pooler
    output where the backbone has one, else the first token); ``advance(n)`` is called after
    each batch of ``n`` images (a progress bar's)."""
    from mixcli.features import head_features

    was_training = backbone.training
    backbone.eval()
    param = next(backbone.parameters())
    w = head_weight.to(param.device, torch.float32)
    b = head_bias.to(param.device, torch.float32)
    correct = 0
    for i in range(0, len(labels), batch_size):
        x = pixel_values[i : i + batch_size].to(param.device, param.dtype)
        logits = head_features(backbone(pixel_values=x), feature, where=where).float() @ w.T + b
        correct += (logits.argmax(-1).cpu() == labels[i : i + batch_size].cpu()).sum().item()
        if advance is not None:
            advance(len(x))
    backbone.train(was_training)
    return correct / max(len(labels), 1)


@torch.no_grad()
def exact_match(
    model,
    tokenizer,
    prompts: Sequence[str],
    answers: Sequence[str],
    max_new_tokens: int = 32,
    batch_size: int = 128,
    advance: Callable[[int], None] | None = None,
) -> float:
    """Fraction of prompts whose greedy continuation, decoded and stripped, equals the answer;
    prompts are tokenised as the model expects (:mod:`mixcli.tokens`: BOS once, from the
    tokenizer's template or the generation config); ``advance(n)`` is called after each batch
    of ``n`` prompts."""
    from mixcli import tokens

    was_training = model.training
    model.eval()
    marks = tokens.model_specials(tokenizer, model)
    device = next(model.parameters()).device
    hits = 0
    try:
        for i in range(0, len(prompts), batch_size):
            # left padding: the continuations start at the same column
            enc = tokens.batch(tokenizer, [str(p) for p in prompts[i : i + batch_size]], marks, left=True)
            enc = {k: v.to(device) for k, v in enc.items()}
            out = model.generate(
                **enc,
                do_sample=False,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokens.pad_id(tokenizer),
                eos_token_id=tokenizer.eos_token_id,
            )
            gen = out[:, enc["input_ids"].shape[1] :]
            texts = tokenizer.batch_decode(gen, skip_special_tokens=True)
            for text, ans in zip(texts, answers[i : i + batch_size]):
                hits += text.strip() == str(ans).strip()
            if advance is not None:
                advance(len(texts))
    finally:
        model.train(was_training)
    return hits / max(len(prompts), 1)


@torch.no_grad()
def mean_token_loss(model, tokenizer, texts: Sequence[str], batch_size: int = 32,
                    advance: Callable[[int], None] | None = None) -> float:
    """Mean next-token cross-entropy over all predicted tokens of ``texts`` (exp = perplexity),
    tokenised as the model expects (:mod:`mixcli.tokens`; right padding, so positions are
    those of training); ``advance(n)`` is called after each batch of ``n`` texts."""
    from mixcli import tokens

    was_training = model.training
    model.eval()
    marks = tokens.model_specials(tokenizer, model)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(texts), batch_size):
        enc = tokens.batch(tokenizer, [str(t) for t in texts[i : i + batch_size]], marks, left=False)
        ids = enc["input_ids"].to(device)
        mask = enc["attention_mask"].to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        target = ids[:, 1:]
        tmask = mask[:, 1:].bool() & mask[:, :-1].bool()
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none"
        ).view_as(target)
        total += loss[tmask].sum().item()
        count += int(tmask.sum().item())
        if advance is not None:
            advance(len(ids))
    model.train(was_training)
    return total / count if count else math.nan
