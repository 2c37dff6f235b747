"""Text to token ids as a causal LM expects them, shared by router tuning rows, router prompts
and evaluation prompts, so that all three see what the model was trained on.

A sequence starts with the BOS token when the tokenizer's own template adds it, or when the
model's generation config names the tokenizer's BOS (hand-built tokenizers often have no
template although their model was trained with BOS first). The BOS is added exactly once:
a text that already starts with the BOS token's text gives the same ids as one that does
not. EOS is appended only where asked (training rows: the model learns to stop).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Specials:
    """What :func:`encode` adds: the BOS id to put first (None: none) and the EOS id to append."""

    bos: int | None
    eos: int | None


def _probe(tokenizer) -> list[int]:
    try:
        return list(tokenizer("")["input_ids"])
    except Exception:  # a tokenizer that refuses the empty text adds nothing we can detect
        return []


def specials(tokenizer, generation_config=None) -> Specials:
    """The special tokens the model expects, from the tokenizer and the model's generation
    config (a ``GenerationConfig``, a dict of ``generation_config.json``, or None)."""
    bos = tokenizer.bos_token_id
    if isinstance(generation_config, dict):
        named = generation_config.get("bos_token_id")
    else:
        named = getattr(generation_config, "bos_token_id", None)
    wanted = bos is not None and (bos in _probe(tokenizer) or named == bos)
    return Specials(bos if wanted else None, tokenizer.eos_token_id)


def generation_settings(folder) -> dict:
    """What the model in ``folder`` generates with, as transformers reads it: its
    generation_config.json, or without one the ``bos_token_id`` / ``eos_token_id`` of its
    config.json (of ``text_config`` where the top level names none), or {}."""
    import json
    from pathlib import Path

    def read(name):
        try:
            data = json.loads((Path(folder) / name).read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    generation = read("generation_config.json")
    if generation is not None:
        return generation
    config = read("config.json") or {}
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    found = {}
    for key in ("bos_token_id", "eos_token_id"):
        value = config.get(key, text.get(key))
        if value is not None:
            found[key] = value
    return found


def model_specials(tokenizer, model) -> Specials:
    """:func:`specials` of a model folder (a path: :func:`generation_settings`) or of a loaded
    model (its folder when it was loaded from one, else its ``generation_config``), so that
    tuning rows, router prompts and evaluation prompts agree on BOS and EOS."""
    from pathlib import Path

    if isinstance(model, (str, Path)):
        return specials(tokenizer, generation_settings(model))
    folder = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    if folder and Path(folder).is_dir():
        return specials(tokenizer, generation_settings(folder))
    return specials(tokenizer, getattr(model, "generation_config", None))


def encode(tokenizer, text: str, marks: Specials, *, eos: bool = False, max_length: int = 0) -> list[int]:
    """Token ids of ``text``: ``marks.bos`` first (once, whether or not ``text`` starts with the
    BOS token's text), then the text without the tokenizer's template, then EOS if ``eos``
    (once); cut to ``max_length`` tokens (0: no limit) keeping the start."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    bos_id = tokenizer.bos_token_id
    while ids and bos_id is not None and ids[0] == bos_id:
        ids = ids[1:]
    if marks.bos is not None:
        ids = [marks.bos] + ids
    if eos and marks.eos is not None and (not ids or ids[-1] != marks.eos):
        ids.append(marks.eos)
    return ids[:max_length] if max_length else ids


def encode_answer(tokenizer, prompt: str, answer: str, marks: Specials, *, eos: bool = True) -> tuple[list[int], int]:
    """(ids of ``prompt + answer`` as :func:`encode` gives them, index of the first token holding
    a character of the answer). BPE and SentencePiece tokenizers merge across the seam (a prompt
    ending in a space, ``'hel' + 'lo world'``), so the prompt tokenised alone would put the
    start in the wrong place: a fast tokenizer's offsets of the whole text say where the answer
    starts; any other tokenizer encodes the prompt and the answer apart and joins the ids."""
    bos_id = tokenizer.bos_token_id
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(prompt + answer, add_special_tokens=False, return_offsets_mapping=True)
        ids, spans = list(enc["input_ids"]), list(enc["offset_mapping"])
        while ids and bos_id is not None and ids[0] == bos_id:
            ids, spans = ids[1:], spans[1:]
        start = next((i for i, (_, end) in enumerate(spans) if end > len(prompt)), len(ids))
    else:
        ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        while ids and bos_id is not None and ids[0] == bos_id:
            ids = ids[1:]
        start = len(ids)
        ids += list(tokenizer(answer, add_special_tokens=False)["input_ids"])
    if marks.bos is not None:
        ids, start = [marks.bos] + ids, start + 1
    if eos and marks.eos is not None and (not ids or ids[-1] != marks.eos):
        ids.append(marks.eos)
    return ids, start


def pad_id(tokenizer) -> int:
    """The id padded positions get (masked out, so any id does)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id):
        if candidate is not None:
            return candidate
    return 0


def batch(tokenizer, texts, marks: Specials, *, left: bool = True, max_length: int = 0):
    """``{"input_ids", "attention_mask"}`` tensors of ``texts`` encoded by :func:`encode`,
    padded on the left (generation, last-token states) or the right."""
    import torch

    rows = [encode(tokenizer, text, marks, max_length=max_length) for text in texts]
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad_id(tokenizer), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return {"input_ids": ids, "attention_mask": mask}


def surprises(tokenizer, text: str, ids: list[int]) -> list[str]:
    """Why ``text`` (encoded as ``ids``) reads differently from how the model was trained:
    unknown characters (the tokenizer's UNK token), or a special token's text inside it."""
    found = []
    unk = tokenizer.unk_token_id
    if unk is not None and unk in ids:
        unknown = sorted({c for c in text if unk in tokenizer(c, add_special_tokens=False)["input_ids"]})
        found.append("characters the tokenizer does not know (read as its unknown token): "
                     + (" ".join(repr(c) for c in unknown[:5]) if unknown else repr(tokenizer.unk_token)))
    body = text
    if tokenizer.bos_token and body.startswith(tokenizer.bos_token):
        body = body[len(tokenizer.bos_token):]
    if tokenizer.eos_token and body.endswith(tokenizer.eos_token):
        body = body[:-len(tokenizer.eos_token)]
    inside = [t for t in dict.fromkeys((tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token))
              if t and t in body]
    if inside:
        found.append("a special token's text inside the row (" + ", ".join(repr(t) for t in inside) + ")")
    return found


def warn_surprises(tokenizer, texts, ids, where: str, names=None, limit: int = 3) -> int:
    """One warning naming the rows (``names[i]``, default "row i+1") that :func:`surprises`
    finds; returns how many there are."""
    from .errors import warn

    bad = []
    for i, (text, row) in enumerate(zip(texts, ids)):
        why = surprises(tokenizer, text, row)
        if why:
            bad.append(f"{names[i] if names else f'row {i + 1}'} {text[:40]!r}: {'; '.join(why)}")
    if bad:
        more = f" (and {len(bad) - limit} more)" if len(bad) > limit else ""
        warn(f"{where}: {len(bad)} of {len(texts)} rows are tokenised differently from the model's training "
             f"text: " + " | ".join(bad[:limit]) + more)
    return len(bad)
