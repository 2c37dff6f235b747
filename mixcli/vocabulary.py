"""Tokenizers and vocabularies: the ``[tokenizer]`` table, the output vocabulary built from
the models' tokenizers, and the re-indexing of vocabulary-indexed tensors (embeddings,
heads) into it before they are merged.

The output vocabulary is deterministic: the base's tokens by id, then (``union``) each other
model's missing tokens in the order of ``[models]``, each model's tokens by id, then the
``tokens`` entries. A token a model lacks (or holds at an id beyond its rows) gets, unless a
``tokens`` entry says otherwise, the row of the one model that has it, else the base's row if
several have it and the base does, else the mean of the rows of those that have it, else
zeros (with a warning); a model keeps its own row where it has the token. Rows beyond the
tokens are padding: each model's own row where it has one, else the mean of its token rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import MixcliError, closest

TOKENIZER_KEYS = ("source", "tokens", "pad_to_multiple_of", "rows", "keep_rows")
TOKEN_KEYS = ("source", "force")
KINDS = ("model", "model_token", "zero")


@dataclass
class TokenSource:
    kind: str  # "model", "model_token" or "zero"
    model: str | None = None
    token: str | None = None
    token_id: int | None = None


@dataclass
class TokenEntry:
    token: str
    source: TokenSource
    force: bool
    where: str


@dataclass
class TokenizerSettings:
    """The project's ``[tokenizer]`` table."""

    source: str  # "base", "union", or a model name
    tokens: list[TokenEntry]
    pad_to_multiple_of: int | None
    rows: int | None
    keep_rows: bool
    where: str


def _model(value: Any, where: str, models) -> str:
    name = value[len("model:"):] if isinstance(value, str) and value.startswith("model:") else value
    if not isinstance(name, str) or name not in models:
        raise MixcliError(f"{where}: no model named {name!r} in [models]{closest(str(name), models)}")
    return name


def parse_tokenizer(table: Any, where: str, models) -> TokenizerSettings:
    """Check a ``[tokenizer]`` table against the project's model names (no file is read)."""
    if not isinstance(table, dict):
        raise MixcliError(f"{where} must be a table")
    for key in table:
        if key not in TOKENIZER_KEYS:
            raise MixcliError(f"{where}: unknown key '{key}'{closest(key, TOKENIZER_KEYS)}")
    source = table.get("source", "union")
    if source not in ("base", "union"):
        source = _model(source, f"{where} source (\"base\", \"union\" or \"model:NAME\")", models)
    counts = {}
    for key in ("pad_to_multiple_of", "rows"):
        value = table.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise MixcliError(f"{where}: {key} must be a positive integer, got {value!r}")
        counts[key] = value
    keep_rows = table.get("keep_rows", True)
    if not isinstance(keep_rows, bool):
        raise MixcliError(f"{where}: keep_rows must be true or false")
    entries = []
    tokens = table.get("tokens", {})
    if not isinstance(tokens, dict):
        raise MixcliError(f"{where}: tokens must be a table of token = {{ source = ..., force = ... }}")
    for token, entry in tokens.items():
        here = f"{where}: tokens.{token!r}"
        if isinstance(entry, str):
            entry = {"source": entry}
        if not isinstance(entry, dict):
            raise MixcliError(f"{here} must be a table {{ source = ..., force = ... }}")
        for key in entry:
            if key not in TOKEN_KEYS:
                raise MixcliError(f"{here}: unknown key '{key}'{closest(key, TOKEN_KEYS)}")
        if "source" not in entry:
            raise MixcliError(f"{here}: 'source' is missing; give \"model:NAME\", \"zero\" or "
                              "{ kind = \"model_token\", model = \"NAME\", token = \"...\" }")
        force = entry.get("force", False)
        if not isinstance(force, bool):
            raise MixcliError(f"{here}: force must be true or false")
        entries.append(TokenEntry(token, _token_source(entry["source"], here, models), force, here))
    return TokenizerSettings(source, entries, counts["pad_to_multiple_of"], counts["rows"], keep_rows, where)


def _token_source(value: Any, where: str, models) -> TokenSource:
    if value == "zero":
        return TokenSource("zero")
    if isinstance(value, str):
        return TokenSource("model", _model(value, f"{where} source", models))
    if not isinstance(value, dict):
        raise MixcliError(f"{where}: source must be \"model:NAME\", \"zero\" or a table with kind")
    kind = value.get("kind")
    if kind not in KINDS:
        raise MixcliError(f"{where}: source kind must be one of {', '.join(KINDS)}, got {kind!r}"
                          f"{closest(str(kind), KINDS)}")
    allowed = {"model": ("kind", "model"), "model_token": ("kind", "model", "token", "token_id"),
               "zero": ("kind",)}[kind]
    for key in value:
        if key not in allowed:
            raise MixcliError(f"{where}: source key '{key}' does not apply to kind '{kind}'")
    if kind == "zero":
        return TokenSource("zero")
    model = _model(value.get("model"), f"{where} source model", models)
    if kind == "model":
        return TokenSource("model", model)
    token, token_id = value.get("token"), value.get("token_id")
    if (token is None) == (token_id is None):
        raise MixcliError(f"{where}: a model_token source needs exactly one of token and token_id")
    if token is not None and not isinstance(token, str):
        raise MixcliError(f"{where}: token must be a string")
    if token_id is not None and (isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0):
        raise MixcliError(f"{where}: token_id must be a non-negative integer")
    return TokenSource("model_token", model, token, token_id)


@dataclass
class ModelVocabulary:
    """One model's tokenizer as far as its embedding rows reach."""

    name: str
    tokens: dict[str, int]  # token -> id, ids below ``rows`` only
    rows: int
    tokenizer: Any = None
    beyond: list[str] = field(default_factory=list)  # tokens the tokenizer lists past the rows


def load_tokenizer(folder: Path, where: str):
    """The model's tokenizer (tokenizer files only; transformers is imported here)."""
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(str(folder))
    except Exception as error:  # transformers raises many kinds for unusable tokenizer files
        raise MixcliError(f"{where}: cannot load the tokenizer of {folder} ({type(error).__name__}: "
                          f"{str(error).splitlines()[0] if str(error) else ''}); the [tokenizer] table needs "
                          "each model's tokenizer files") from None


def model_vocabulary(name: str, folder: Path, rows: int, where: str) -> ModelVocabulary:
    tokenizer = load_tokenizer(folder, where)
    vocab = tokenizer.get_vocab()
    inside = {t: i for t, i in vocab.items() if i < rows}
    beyond = sorted((t for t, i in vocab.items() if i >= rows), key=vocab.get)
    return ModelVocabulary(name, inside, rows, tokenizer, beyond)


@dataclass
class Vocabulary:
    """The output vocabulary and, per model, where each of its rows comes from."""

    tokens: list[str]  # output id -> token
    rows: int  # rows of the output embeddings (tokens plus padding)
    models: dict[str, ModelVocabulary]
    settings: TokenizerSettings
    base: str
    added: dict[str, list[str]]  # per model, output tokens it lacks
    dropped: dict[str, list[str]]  # per model, its tokens the output lacks
    row_source: str | None  # the model whose extra rows the output keeps (source = base / a model)
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> list[str]:
        """Lines for the plan, the console and the model card."""
        lines = [f"vocabulary: {len(self.tokens)} tokens, {self.rows} rows ([tokenizer] source = "
                 f"{self.settings.source})"]
        for name in self.models:
            for label, items in (("lacks", self.added[name]), ("loses", self.dropped[name])):
                if items:
                    shown = ", ".join(repr(t) for t in items[:8]) + (", ..." if len(items) > 8 else "")
                    lines.append(f"model '{name}' {label} {len(items)} token(s) of the output: {shown}"
                                 if label == "lacks" else
                                 f"model '{name}' has {len(items)} token(s) the output drops: {shown}")
        return lines


def build_vocabulary(settings: TokenizerSettings, models: dict[str, ModelVocabulary], base: str) -> Vocabulary:
    """The output token list and row count (see the module docstring for the order)."""
    order = [base] + [name for name in models if name != base]
    source = base if settings.source == "base" else (None if settings.source == "union" else settings.source)
    if source is None:
        tokens = []
        seen = set()
        for name in order:
            for token in sorted(models[name].tokens, key=models[name].tokens.get):
                if token not in seen:
                    seen.add(token)
                    tokens.append(token)
    else:
        vocab = models[source].tokens
        tokens = sorted(vocab, key=vocab.get)
    present = set(tokens)
    for entry in settings.tokens:
        if entry.token not in present:
            present.add(entry.token)
            tokens.append(entry.token)
    count = len(tokens)
    keep_from = source if source is not None and settings.keep_rows else None
    rows = max(count, models[keep_from].rows) if keep_from else count
    if settings.rows is not None:
        if settings.rows < count:
            raise MixcliError(f"{settings.where}: rows = {settings.rows} is fewer than the output's "
                              f"{count} tokens")
        rows = settings.rows
    if settings.pad_to_multiple_of:
        rows = -(-rows // settings.pad_to_multiple_of) * settings.pad_to_multiple_of
    vocabulary = Vocabulary(tokens, rows, models, settings, base,
                            added={n: [t for t in tokens if t not in m.tokens] for n, m in models.items()},
                            dropped={n: sorted((t for t in m.tokens if t not in present), key=m.tokens.get)
                                     for n, m in models.items()},
                            row_source=keep_from)
    _check_entries(vocabulary)
    for name, model in models.items():
        if model.beyond:
            vocabulary.warnings.append(
                f"model '{name}': its tokenizer lists {len(model.beyond)} token(s) at ids beyond its "
                f"{model.rows} embedding rows ({', '.join(map(repr, model.beyond[:4]))}); they count as missing")
    return vocabulary


def _check_entries(vocabulary: Vocabulary) -> None:
    for entry in vocabulary.settings.tokens:
        source = entry.source
        if source.kind == "model" and entry.token not in vocabulary.models[source.model].tokens:
            raise MixcliError(f"{entry.where}: model '{source.model}' has no token {entry.token!r}; "
                              "choose a model that has it, or a model_token or zero source")
        if source.kind == "model_token":
            model = vocabulary.models[source.model]
            if source.token is not None and source.token not in model.tokens:
                raise MixcliError(f"{entry.where}: model '{source.model}' has no token {source.token!r}"
                                  f"{closest(source.token, model.tokens)}")
            if source.token_id is not None and source.token_id >= model.rows:
                raise MixcliError(f"{entry.where}: token_id {source.token_id} is out of range: model "
                                  f"'{source.model}' has {model.rows} rows")


@dataclass
class RowPlan:
    """How one vocabulary-indexed tensor of each member model becomes ``rows`` aligned rows.

    For every member: ``keep`` (output rows, own rows) it keeps; every other output row
    below ``count`` takes the shared ``fill`` row, a weighted sum of member rows
    (``fill_terms``: member index, output rows, member rows, weight); rows from ``count``
    on are padding (``pad_keep`` own rows, else the mean of the member's token rows).
    """

    rows: int
    count: int
    keep: list[tuple[list[int], list[int]]]
    fill_terms: list[tuple[int, list[int], list[int], float]]
    zero_rows: list[int]
    pad_keep: list[tuple[list[int], list[int]]]


def row_plan(vocabulary: Vocabulary, members: list[str], base: str | None) -> RowPlan:
    """The alignment of one tensor group (only the group's members take part)."""
    tokens, count = vocabulary.tokens, len(vocabulary.tokens)
    vocabs = [vocabulary.models[m].tokens for m in members]
    entries = {e.token: e for e in vocabulary.settings.tokens}
    keep = [([], []) for _ in members]
    fills: dict[int, list[tuple[int, int, float]]] = {}  # output row -> (member, member row, weight)
    zero_rows = []

    def member_index(name: str) -> int:
        if name not in members:
            raise MixcliError(f"{vocabulary.settings.where}: a tokens entry takes rows from model '{name}', "
                              f"which this tensor group ({', '.join(members)}) does not read")
        return members.index(name)

    for out, token in enumerate(tokens):
        having = [(i, v[token]) for i, v in enumerate(vocabs) if token in v]
        entry = entries.get(token)
        forced = entry is not None and entry.force
        for i, row in having:
            if not forced:
                keep[i][0].append(out)
                keep[i][1].append(row)
        if len(having) == len(members) and not forced:
            continue
        if entry is not None:
            source = entry.source
            if source.kind == "zero":
                fills[out] = []
            elif source.kind == "model":
                fills[out] = [(member_index(source.model), vocabulary.models[source.model].tokens[token], 1.0)]
            else:
                model = vocabulary.models[source.model]
                row = source.token_id if source.token_id is not None else model.tokens[source.token]
                fills[out] = [(member_index(source.model), row, 1.0)]
        elif len(having) == 1:
            fills[out] = [(having[0][0], having[0][1], 1.0)]
        elif not having:
            fills[out] = []
        elif base is not None and base in members and token in vocabs[members.index(base)]:
            index = members.index(base)
            fills[out] = [(index, vocabs[index][token], 1.0)]
        else:
            fills[out] = [(i, row, 1.0 / len(having)) for i, row in having]
        if not fills[out]:
            zero_rows.append(out)
    terms: dict[tuple[int, float], tuple[list[int], list[int]]] = {}
    for out, contributions in fills.items():
        for index, row, weight in contributions:
            outs, rows = terms.setdefault((index, weight), ([], []))
            outs.append(out)
            rows.append(row)
    pad_keep = []
    for name in members:
        own = vocabulary.models[name].rows
        reserved = list(range(count, min(vocabulary.rows, own))) if vocabulary.row_source else []
        pad_keep.append((reserved, reserved))
    return RowPlan(vocabulary.rows, count, keep,
                   [(i, outs, rows, w) for (i, w), (outs, rows) in terms.items()], zero_rows, pad_keep)


def align(tensors: list, plan: RowPlan) -> list:
    """Re-index each member's vocabulary-indexed tensor (rows on axis 0) into the output rows."""
    import torch

    dtype = tensors[0].dtype
    tail = tuple(tensors[0].shape[1:])
    fill = torch.zeros((plan.rows,) + tail, dtype=dtype)
    for index, outs, rows, weight in plan.fill_terms:
        rows_t = torch.tensor(rows, dtype=torch.long)
        outs_t = torch.tensor(outs, dtype=torch.long)
        values = tensors[index].index_select(0, rows_t)
        fill.index_add_(0, outs_t, values if weight == 1.0 else values * weight)
    aligned = []
    for tensor, (outs, rows), (pad_outs, pad_rows) in zip(tensors, plan.keep, plan.pad_keep):
        out = fill.clone()
        if outs:
            out.index_copy_(0, torch.tensor(outs, dtype=torch.long),
                            tensor.index_select(0, torch.tensor(rows, dtype=torch.long)))
        if plan.rows > plan.count:
            out[plan.count:] = out[:plan.count].mean(dim=0, keepdim=True)
            if pad_outs:
                out.index_copy_(0, torch.tensor(pad_outs, dtype=torch.long),
                                tensor.index_select(0, torch.tensor(pad_rows, dtype=torch.long)))
        aligned.append(out)
    return aligned


def tokenizer_files(vocabulary: Vocabulary) -> dict[str, bytes]:
    """The output tokenizer's files: the source model's tokenizer with the added tokens."""
    import copy
    import tempfile

    source = vocabulary.settings.source if vocabulary.settings.source not in ("base", "union") else vocabulary.base
    model = vocabulary.models[source]
    tokenizer = model.tokenizer
    have = dict(model.tokens)
    new = [t for t in vocabulary.tokens if t not in have]
    specials = set()
    for other in vocabulary.models.values():
        specials.update(getattr(other.tokenizer, "all_special_tokens", []) or [])
    if new:
        from transformers import AddedToken

        tokenizer = copy.deepcopy(tokenizer)
        for token in new:
            tokenizer.add_tokens([AddedToken(token, special=token in specials, normalized=False)],
                                 special_tokens=token in specials)
    vocab = tokenizer.get_vocab()
    wrong = next((t for i, t in enumerate(vocabulary.tokens) if vocab.get(t) != i), None)
    if wrong is not None:
        raise MixcliError(f"{vocabulary.settings.where}: the output tokenizer would give {wrong!r} id "
                          f"{vocab.get(wrong)}, not {vocabulary.tokens.index(wrong)}: its source tokenizer has "
                          "gaps in its ids; choose another source")
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        return {path.name: path.read_bytes() for path in Path(folder).iterdir() if path.is_file()}


def special_token_ids(tokenizer) -> dict[str, int]:
    """Config fields naming special tokens, as the output tokenizer numbers them."""
    ids = {}
    for field_name, attribute in (("bos_token_id", "bos_token"), ("eos_token_id", "eos_token"),
                                  ("pad_token_id", "pad_token")):
        token = getattr(tokenizer, attribute, None)
        if token:
            ids[field_name] = tokenizer.convert_tokens_to_ids(token)
    return ids
