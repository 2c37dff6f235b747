"""Where the vocabulary meets the merge plan: which tensors are indexed by token, whether the
models agree on their vocabulary, and the output vocabulary of a ``[tokenizer]`` table."""

from __future__ import annotations

import hashlib

from .architecture import layout_of
from .checkpoint import Checkpoint
from .errors import MixcliError
from .vocabulary import Vocabulary, build_vocabulary, model_vocabulary, special_token_ids

TOKENIZER_DESCRIPTION = ("tokenizer.json", "vocab.json", "tokenizer.model", "vocab.txt", "merges.txt",
                         "added_tokens.json", "special_tokens_map.json")


def _vocab_size(config: dict) -> int | None:
    value = config.get("vocab_size")
    if isinstance(value, int):
        return value
    text = config.get("text_config")
    return _vocab_size(text) if isinstance(text, dict) else None


def embedding_rows(ckpt: Checkpoint) -> int | None:
    """The rows of the model's input embedding (its vocabulary as the weights see it)."""
    stored = [name for name in layout_of(ckpt.config).embeddings if name in ckpt.tensors]
    return ckpt.tensors[stored[0]].shape[0] if stored else _vocab_size(ckpt.config)


def vocabulary_tensors(ckpt: Checkpoint) -> set[str]:
    """The input embeddings and the output head, as the architecture layout names them."""
    layout = layout_of(ckpt.config)
    return {name for name in (*layout.embeddings, layout.head) if name is not None and name in ckpt.tensors}


def _fingerprint(ckpt: Checkpoint) -> str | None:
    digest = hashlib.sha256()
    found = False
    for name in TOKENIZER_DESCRIPTION:
        path = ckpt.path / name
        if path.is_file():
            found = True
            digest.update(name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest() if found else None


def check_same_vocabulary(models: dict[str, Checkpoint], where: str) -> None:
    """Without ``[tokenizer]``, the models must share one vocabulary: the same embedding rows
    and, where tokenizer files differ, the same token ids."""
    rows = {name: embedding_rows(ckpt) for name, ckpt in models.items()}
    names = list(models)
    first = names[0]
    hint = ("add a [tokenizer] table (source = \"union\", \"base\" or \"model:NAME\") to align "
            "the vocabularies")
    for name in names[1:]:
        if rows[name] != rows[first] and rows[name] is not None and rows[first] is not None:
            raise MixcliError(f"{where}: models '{first}' and '{name}' have vocabularies of different size "
                              f"({rows[first]} and {rows[name]} embedding rows); {hint}")
    prints = {name: _fingerprint(ckpt) for name, ckpt in models.items()}
    if len({p for p in prints.values() if p is not None}) <= 1:
        return  # identical tokenizer files (or none to compare)
    vocabs = {}
    for name, ckpt in models.items():
        if prints[name] is not None:
            vocabs[name] = model_vocabulary(name, ckpt.path, rows[name] or 0, f"{where} model '{name}'").tokens
    named = list(vocabs)
    for name in named[1:]:
        a, b = vocabs[named[0]], vocabs[name]
        if a != b:
            token = next((t for t in sorted(set(a) | set(b), key=lambda t: (a.get(t, 1 << 62), t))
                          if a.get(t) != b.get(t)), None)
            raise MixcliError(f"{where}: models '{named[0]}' and '{name}' have different vocabularies (token "
                              f"{token!r} has id {a.get(token)} in one and {b.get(token)} in the other); {hint}")


def plan_vocabulary(project, models: dict[str, Checkpoint]) -> Vocabulary | None:
    """The output vocabulary of the project's ``[tokenizer]`` table, or None without one."""
    settings = project.tokenizer
    if settings is None:
        check_same_vocabulary(models, f"{project.where}: [models]")
        return None
    if not project.copy_tokenizer:
        raise MixcliError(f"{settings.where}: [output] copy_tokenizer = false would leave out the tokenizer "
                          "that [tokenizer] builds for the re-indexed embeddings; drop one of them")
    vocabs = {}
    for name, ckpt in models.items():
        rows = embedding_rows(ckpt)
        if rows is None:
            raise MixcliError(f"{project.where}: model '{name}' has no embedding tensor and no vocab_size, so "
                              "[tokenizer] cannot align it")
        vocabs[name] = model_vocabulary(name, ckpt.path, rows, f"{settings.where}: model '{name}'")
    base = project.base or next(iter(models))
    return build_vocabulary(settings, vocabs, base)


def apply_to_config(config: dict, vocabulary: Vocabulary) -> None:
    """The output config's vocabulary size and special-token ids follow the output vocabulary."""
    holder = config if "vocab_size" in config or not isinstance(config.get("text_config"), dict) \
        else config["text_config"]
    holder["vocab_size"] = vocabulary.rows
    source = vocabulary.settings.source
    model = vocabulary.models[source if source not in ("base", "union") else vocabulary.base]
    for key, value in special_token_ids(model.tokenizer).items():
        if key in holder and isinstance(value, int) and value < len(vocabulary.tokens):
            holder[key] = value
