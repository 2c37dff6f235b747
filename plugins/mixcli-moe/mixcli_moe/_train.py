"""Router tuning behind ``mixcli tune``: data, loss, log and atomic save; the processes, loop,
learning-rate schedule and loss curve are mixcli's training runtime (:mod:`mixcli.training`)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from mixcli import MixcliError
from mixcli.datafiles import load_rows
from mixcli.errors import first_line
from mixcli.loading import from_pretrained
from mixcli.tokens import generation_settings

from ._balance import RouterCapture, balance_loss, is_router, load_fractions


def load_texts(settings, project_dir: Path) -> list[tuple[str, str | None, str]]:
    """(text, its prompt when the loss counts the answer only, else None, where it comes from)
    per row of every [tune] data file."""
    files = settings.data if isinstance(settings.data, list) else [settings.data]
    rows = [r for file in files for r in _read(file, settings, project_dir)]
    if len(rows) < 2:
        raise MixcliError(f"[tune] data: {len(rows)} rows; router tuning needs at least 2")
    return rows


def _read(file: str, settings, project_dir: Path) -> list[tuple[str, str | None, str]]:
    path = Path(file).expanduser()
    path = path if path.is_absolute() else project_dir / path
    where = "[tune] data"
    data = load_rows(path, where)
    columns = data.column_names
    has_pairs = settings.prompt_field in columns and settings.answer_field in columns
    # default (None): answer-only loss whenever the rows are prompt/answer
    answer_only = has_pairs if settings.answer_only is None else settings.answer_only
    if answer_only and not has_pairs:
        raise MixcliError(f"{where}: {path} has no '{settings.prompt_field}' + '{settings.answer_field}' columns, "
                          f"which answer_only = true needs (columns: {', '.join(columns)})")
    if settings.text_field in columns and not answer_only:
        return [(str(t), None, f"{path.name} row {i + 1}") for i, t in enumerate(data[settings.text_field])]
    if has_pairs:
        return [(str(p) + str(a), str(p) if answer_only else None, f"{path.name} row {i + 1}")
                for i, (p, a) in enumerate(zip(data[settings.prompt_field], data[settings.answer_field]))]
    raise MixcliError(f"{where}: {path} has neither a '{settings.text_field}' column nor "
                      f"'{settings.prompt_field}' + '{settings.answer_field}' (columns: {', '.join(columns)})")


def tokenize(tokenizer, rows, settings, generation_config=None) -> list[tuple[list[int], int]]:
    """(token ids, index of the first token the loss counts) per row, with BOS and EOS as the
    model expects them (:mod:`mixcli.tokens`); rows of one token are dropped, rows the model
    would read differently from its training text are named in a warning. A row with a
    prompt (answer-only loss) starts its loss at the first token holding a character of the
    answer (:func:`mixcli.tokens.encode_answer`).
    Rows longer than ``max_length`` are cut to it (their EOS lost); a row whose prompt alone
    reaches ``max_length`` is dropped (nothing of its answer is left); one warning names both."""
    from mixcli import tokens

    marks = tokens.specials(tokenizer, generation_config)
    texts = [text for text, _, _ in rows]
    names = [name for _, _, name in rows]
    full, starts = [], []
    for text, prompt, _ in rows:
        if prompt is None:
            seq, start = tokens.encode(tokenizer, text, marks, eos=True), 1
        else:
            seq, start = tokens.encode_answer(tokenizer, prompt, text[len(prompt):], marks)
        full.append(seq)
        starts.append(max(1, start))
    tokens.warn_surprises(tokenizer, texts, full, "[tune] data", names)
    limit = settings.max_length
    kept, dropped, cut = [], [], []
    for (_, prompt, name), seq, start in zip(rows, full, starts):
        if limit and len(seq) > limit:
            (dropped if prompt is not None and start >= limit else cut).append(name)
            seq = seq[:limit]
        if len(seq) > start:
            kept.append((seq, start))
    _warn_cut(limit, len(rows), dropped, cut)
    return kept


def _warn_cut(limit: int, total: int, dropped: list[str], cut: list[str], shown: int = 3) -> None:
    from mixcli.errors import warn

    def named(found):
        return ", ".join(found[:shown]) + (f" (and {len(found) - shown} more)" if len(found) > shown else "")

    parts = []
    if dropped:
        parts.append(f"{len(dropped)} of {total} rows dropped, their prompt alone has {limit} tokens or more: "
                     + named(dropped))
    if cut:
        parts.append(f"{len(cut)} of {total} rows cut to {limit} tokens, their answer (or text) loses its end "
                     "and EOS: " + named(cut))
    if parts:
        warn(f"[tune] data: max_length = {limit}: " + "; ".join(parts))


def batch_tensors(sequences: list[tuple[list[int], int]], pad: int):
    """ids, attention mask and labels (-100 on padding and on tokens before each row's start)."""
    length = max(len(s) for s, _ in sequences)
    ids = torch.full((len(sequences), length), pad, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    labels = torch.full((len(sequences), length), -100, dtype=torch.long)
    for i, (seq, start) in enumerate(sequences):
        ids[i, :len(seq)] = torch.tensor(seq)
        mask[i, :len(seq)] = 1
        labels[i, start:len(seq)] = ids[i, start:len(seq)]
    return ids, mask, labels


def select_trainable(model, extra: list[str]) -> list[str]:
    names = []
    for name, param in model.named_parameters():
        param.requires_grad_(is_router(name) or any(part in name for part in extra))
        if param.requires_grad:
            names.append(name)
    if not any(is_router(n) for n in names):
        raise MixcliError("the model has no routers (mlp.gate / *.router); tune takes MoE outputs of mixcli-moe")
    return names


def next_token_ce_sum(logits, labels):
    """Summed cross-entropy of each position's prediction of the next token (labels -100 skipped)."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                           ignore_index=-100, reduction="sum")


def losses(model, capture, ids, mask, labels, k: int, tokens_global: float, coef: float):
    """(local loss to backpropagate, CE sum, aux contribution, groups) for this rank's batch."""
    capture.clear()
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    ce_sum = next_token_ce_sum(logits, labels)
    groups = capture.logits
    aux = sum(balance_loss(layers, mask, k) for layers in groups.values()) / max(1, len(groups))
    return ce_sum / tokens_global + coef * aux, ce_sum, aux, groups


def evaluate(model, capture, sequences, pad: int, k: int, batch: int) -> dict:
    """Held-out CE (token mean), L_aux and per-layer load fractions (local, no communication)."""
    model.eval()
    ce, tokens, aux_total, batches, loads = 0.0, 0, 0.0, 0, {}
    with torch.no_grad():
        for start in range(0, len(sequences), batch):
            ids, mask, labels = batch_tensors(sequences[start:start + batch], pad)
            capture.clear()
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            ce += float(next_token_ce_sum(logits, labels))
            tokens += int((labels[:, 1:] != -100).sum())
            groups = capture.logits
            aux_total += float(sum(_local_aux(v, mask, k) for v in groups.values()) / max(1, len(groups)))
            batches += 1
            for group, layers in groups.items():
                for i, frac in enumerate(load_fractions(layers, mask, k)):
                    loads.setdefault(group, {}).setdefault(i, []).append(frac)
    model.train()
    mean_loads = {g: [[sum(c) / len(c) for c in zip(*v)] for _, v in sorted(per.items())] for g, per in loads.items()}
    return {"ce": ce / max(1, tokens), "aux": aux_total / max(1, batches), "load": mean_loads}


def _local_aux(layers, mask, k):
    keep = mask.reshape(-1).bool()
    rows = torch.cat([x[keep] for x in layers]).float()
    probs = torch.softmax(rows, -1)
    counts = F.one_hot(torch.topk(probs, k, -1).indices, rows.shape[-1]).sum((0, 1)).float()
    return rows.shape[-1] * torch.sum(counts / rows.shape[0] * probs.mean(0))


def check_moe(source: Path) -> int:
    """Experts per token of the MoE in ``source``, from its config; an error for a dense model."""
    from mixcli.checkpoint import read_config

    config = read_config(source, "mixcli tune")
    k = config.get("num_experts_per_tok")
    if not isinstance(k, int) or not isinstance(config.get("num_local_experts"), int):
        raise MixcliError(f"mixcli tune: {source} holds a {config.get('model_type', 'model')} without experts "
                          "(no num_local_experts / num_experts_per_tok in config.json); tune takes MoE outputs of "
                          "moe_merge or moe_upcycle")
    return k


def load_tokenizer(source: Path):
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(source)
    except Exception as error:  # transformers raises OSError, ValueError, ... for a missing or bad tokenizer
        raise MixcliError(f"mixcli tune: transformers cannot load the tokenizer in {source} ({first_line(error)}); "
                          "tuning needs the tokenizer saved beside the model") from None


def train(source: Path, target: Path, settings, project, *, force: bool, progress: bool):
    if settings.device == "cuda" and not torch.cuda.is_available():
        raise MixcliError("[tune] device is 'cuda', but torch sees no CUDA device here; use 'auto' or 'cpu'")
    cuda = torch.cuda.is_available() and settings.device in ("auto", "cuda")
    from mixcli.training import distributed

    with distributed("cuda" if cuda else "cpu") as world:
        return _train(source, target, settings, project, world, cuda, force, progress)


def _train(source: Path, target: Path, settings, project, world, cuda: bool, force: bool, progress: bool):
    import transformers

    from mixcli.plugins import register_architectures
    from mixcli.progress import quiet_libraries
    from mixcli.training import Step, all_reduce, train_steps

    device = torch.device(f"cuda:{world.local_rank}" if cuda else "cpu")
    register_architectures()
    quiet_libraries()  # transformers' "Loading weights" bar would sit above ours
    torch.manual_seed(settings.seed)
    # the config and data are read before the model, so that a mistake fails before any weight is loaded
    k = check_moe(source)
    tokenizer = load_tokenizer(source)
    rows = load_texts(settings, project.file.parent)
    sequences = tokenize(tokenizer, rows, settings, generation_settings(source))
    if len(sequences) < 2:
        raise MixcliError(f"[tune] data: {len(sequences)} rows of two tokens or more; router tuning needs at least 2")
    if settings.batch_size % world.size:
        raise MixcliError(f"[tune] batch_size ({settings.batch_size}) must be divisible by the number of "
                          f"processes ({world.size})")
    mine = world.share(settings.batch_size, "[tune]")
    model = from_pretrained(transformers.AutoModelForCausalLM, source, "mixcli tune", dtype=torch.float32).to(device)
    if k == 1 and world.main:
        from ._build import warn

        warn(f"{project.where}: [tune]: the model routes each token to 1 expert, whose renormalised weight is "
             "always 1, so the language-model loss gives the routers no gradient (only the balance term, "
             "if any, trains them); merge with experts_per_token >= 2 to tune routing")
    trainable = select_trainable(model, settings.train_modules)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    order = torch.randperm(len(sequences), generator=torch.Generator().manual_seed(settings.seed)).tolist()
    held = min(len(order) - 1, math.ceil(settings.eval_fraction * len(order))) if settings.eval_fraction else 0
    held_out = [sequences[i] for i in order[:held]]
    train_set = [sequences[i] for i in order[held:]]
    capture = RouterCapture(model)
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    before = evaluate(model, capture, held_out, pad, k, settings.batch_size) if held_out else None
    model.train()
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    sampler = torch.Generator().manual_seed(settings.seed + 1)
    stream: list[int] = []

    def step(_):
        nonlocal stream
        while len(stream) < settings.batch_size:
            stream += torch.randperm(len(train_set), generator=sampler).tolist()
        chosen, stream = stream[:settings.batch_size], stream[settings.batch_size:]
        ids, mask, labels = (t.to(device) for t in batch_tensors([train_set[i] for i in chosen[mine]], pad))
        tokens = all_reduce(torch.tensor(float((labels[:, 1:] != -100).sum()), device=device))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss, ce_sum, aux, _ = losses(model, capture, ids, mask, labels, k, float(tokens), settings.aux_loss_coef)
        ce = float(all_reduce(ce_sum.detach())) / float(tokens)
        aux_value = float(all_reduce(aux.detach()))
        # the ranks' gradients are averaged; each rank's loss is its share of the global loss
        return Step(loss * world.size, {"ce": ce, "aux": aux_value, "loss": ce + settings.aux_loss_coef * aux_value})

    history = train_steps(step, params, optimizer, settings.steps, schedule=settings.schedule(),
                          grad_clip=settings.grad_clip, label="tuning routers", progress=progress).rows
    capture.clear()
    after = evaluate(model, capture, held_out, pad, k, settings.batch_size) if held_out else None
    capture.remove()
    if not world.main:
        return None
    log = {"settings": settings.__dict__, "source": str(source), "world_size": world.size,
           "trainable": trainable, "trainable_parameters": sum(p.numel() for p in params),
           "before": before, "after": after, "history": history}
    from ._save import save_tuned

    save_tuned(source, target, model, trainable, settings, log, project, force)
    return {"output": target, "before": before or history[0], "after": after or history[-1],
            "held_out": bool(held_out)}
