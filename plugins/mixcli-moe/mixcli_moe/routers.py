"""Router initialisation: ``random``, ``uniform_random``, ``hidden`` (= ``hidden_last``),
``hidden_avg`` and ``cheap_embed``, computed as mergekit-moe defines them (see the README).

Every function returns float32 routers of shape ``[L, E, H]`` (row ``e`` of layer ``l``
belongs to expert ``e``; ``[L, E, heads x head_dim]`` for o_proj routers, which read the
attention output); the caller casts to the output dtype. Prompt-based modes run the
*base* model only, a few prompts at a time, with no gradient.
"""

from __future__ import annotations

import math

from mixcli import MixcliError
from mixcli.errors import first_line

GATE_MODES = ("hidden", "hidden_avg", "hidden_last", "cheap_embed", "random", "uniform_random")
PROMPT_MODES = ("hidden", "hidden_avg", "hidden_last", "cheap_embed")
EPS = 1e-8
CHUNK = 16  # prompts per forward pass: memory stays at one small batch of activations


RANDOM_SCALE = 0.02  # std of gate_mode "random": Llama's initializer_range, moetify's router init


def random_draws(mode: str, groups: int, layers: int, experts: int, hidden: int, seed: int,
                 scale: float = RANDOM_SCALE) -> list:
    """``groups`` router sets from one generator seeded with ``seed``: the first is
    ``scale`` times mergekit's ``torch.manual_seed(seed); torch.randn(L, E, H)`` (equal to it
    with ``scale = 1``), or the uniform variant U(-1/sqrt(H), 1/sqrt(H))."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    draws = []
    for _ in range(groups):
        if mode == "random":
            draw = torch.randn(layers, experts, hidden, generator=generator, dtype=torch.float32)
            draws.append(draw if scale == 1 else draw * scale)
        else:
            bound = math.sqrt(1.0 / hidden)
            draws.append(torch.rand(layers, experts, hidden, generator=generator) * 2 * bound - bound)
    return draws


def encode(tokenizer, prompts: list[str], marks):
    """One left-padded batch of prompts, BOS as the model expects it (:mod:`mixcli.tokens`)."""
    from mixcli import tokens

    return tokens.batch(tokenizer, prompts, marks, left=True)


def _normalise(v):
    import torch

    return v / torch.clamp(torch.linalg.vector_norm(v, dim=-1, keepdim=True), min=EPS)


# What a router of each layer may read: the residual stream entering the layer (mergekit's
# "hidden"), the input_layernorm output (what q/k/v routers read), the post_attention_layernorm
# output (what the MLP router reads), or the attention output entering o_proj.
PLACES = ("residual", "attn_input", "mlp_input", "o_proj")


def _capture_hooks(decoder, places, captured: dict) -> list:
    hooks = []
    for place, module_of, pre in (("attn_input", lambda layer: layer.input_layernorm, False),
                                  ("mlp_input", lambda layer: layer.post_attention_layernorm, False),
                                  ("o_proj", lambda layer: layer.self_attn.o_proj, True)):
        if place not in places:
            continue
        captured[place] = []
        for layer in decoder.layers:
            store = captured[place]
            if pre:
                hooks.append(module_of(layer).register_forward_pre_hook(lambda _m, args, s=store: s.append(args[0])))
            else:
                hooks.append(module_of(layer).register_forward_hook(lambda _m, _a, out, s=store: s.append(out)))
    return hooks


def prompt_states(model, tokenizer, prompts: list[str], places: tuple = ("residual",), marks=None) -> dict:
    """``{(place, kind): [L, D]}``: mean over prompts of what a router of each layer reads (a
    place of :data:`PLACES`), at the last token (kind "last") and as the masked mean over the
    prompt's tokens (kind "avg"), float32 accumulation, one forward pass per chunk."""
    import torch

    from mixcli import tokens

    marks = marks or tokens.model_specials(tokenizer, model)
    decoder = getattr(model, model.base_model_prefix, model)
    captured: dict = {}
    hooks = _capture_hooks(decoder, places, captured)
    totals: dict = {}
    try:
        for start in range(0, len(prompts), CHUNK):
            batch = encode(tokenizer, prompts[start:start + CHUNK], marks)
            for found in captured.values():
                found.clear()
            with torch.no_grad():
                out = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              output_hidden_states="residual" in places, use_cache=False)
            mask = batch["attention_mask"].to(torch.float32)
            for place in places:
                # hidden_states entry l enters layer l; the last is after the final layer
                states = out.hidden_states[:-1] if place == "residual" else captured[place]
                last, avg = [], []
                for state in states:
                    state = state.to(torch.float32)
                    avg.append(((state * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)).sum(0))
                    last.append(state[:, -1].sum(0))
                for kind, rows in (("last", last), ("avg", avg)):
                    chunk = torch.stack(rows)
                    key = (place, kind)
                    totals[key] = chunk if key not in totals else totals[key] + chunk
    finally:
        for hook in hooks:
            hook.remove()
    return {key: total / len(prompts) for key, total in totals.items()}


def hidden_routers(model, tokenizer, positive: list[list[str]], negative: list[list[str]],
                   places: tuple = ("residual",), marks=None) -> dict:
    """``hidden`` and ``hidden_avg``: ``{(place, kind): R}`` with R_l[e] = normalise(m_l(P_e) -
    m_l(N_e)), kind "last" (hidden) or "avg" (hidden_avg), each ``[L, E, D]``."""
    import torch

    rows: dict = {}
    for pos, neg in zip(positive, negative):
        vectors = prompt_states(model, tokenizer, pos, places, marks)
        negatives = prompt_states(model, tokenizer, neg, places, marks) if neg else {}
        for key, vector in vectors.items():
            rows.setdefault(key, []).append(_normalise(vector - negatives[key] if neg else vector))
    return {key: torch.stack(found, dim=1) for key, found in rows.items()}


def condition_numbers(routers) -> list[float]:
    """Per layer, the condition number of the ``E x D`` router matrix (inf when singular)."""
    import torch

    if routers.shape[1] < 2:
        return [1.0] * routers.shape[0]
    values = []
    for layer in range(routers.shape[0]):
        singular = torch.linalg.svdvals(routers[layer].to(torch.float64))
        values.append(float(singular[0] / singular[-1]) if singular[-1] > 0 else math.inf)
    return values


DEGENERATE = 1e3  # rows this close to parallel route every token alike


def repair_degenerate(last, avg) -> tuple:
    """``hidden`` routers whose layer rows are degenerate (condition number > DEGENERATE: e.g.
    every prompt ends in the same token, so the last positions of layer 0 are one embedding)
    take that layer from the mean over all prompt tokens (``hidden_avg``) instead. Returns
    (routers, {layer: its condition number before})."""
    fixed = last.clone()
    repaired = {}
    for layer, cond in enumerate(condition_numbers(last)):
        if cond > DEGENERATE:
            fixed[layer] = avg[layer]
            repaired[layer] = cond
    return fixed, repaired


def embed_sum(embeddings, tokenizer, prompts: list[str], marks):
    """s(S): the sum of the embedding rows of every real token (BOS included) of every prompt."""
    import torch

    total = torch.zeros(embeddings.shape[1], dtype=torch.float32)
    for start in range(0, len(prompts), CHUNK):
        batch = encode(tokenizer, prompts[start:start + CHUNK], marks)
        ids = batch["input_ids"][batch["attention_mask"].bool()]
        total += embeddings[ids].to(torch.float32).sum(0)
    return total


def cheap_embed_routers(embeddings, tokenizer, positive, negative, layers: int, marks):
    """``cheap_embed``: v_e = u(P_e) - u(N_e) with u = normalised embedding sums; normalised
    again and repeated for every layer."""
    import torch

    rows = []
    for pos, neg in zip(positive, negative):
        vector = _normalise(embed_sum(embeddings, tokenizer, pos, marks))
        if neg:
            vector = vector - _normalise(embed_sum(embeddings, tokenizer, neg, marks))
        rows.append(_normalise(vector))
    return torch.stack(rows)[None].repeat(layers, 1, 1)


def load_tokenizer(base_ckpt, where: str):
    """The base's tokenizer (prompt-based modes), or a one-line error."""
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(base_ckpt.path)
    except Exception as error:  # transformers raises OSError, ValueError, ... for a missing or bad tokenizer
        raise MixcliError(f"{where}: gate_mode needs the tokenizer of the base '{base_ckpt.name}', and "
                          f"transformers cannot load it from {base_ckpt.path} ({first_line(error)}); save the "
                          "tokenizer beside the model or use gate_mode = \"random\"") from None


def specials_of(base_ckpt, tokenizer):
    """BOS/EOS the base expects (:func:`mixcli.tokens.model_specials` of its folder)."""
    from mixcli import tokens

    return tokens.model_specials(tokenizer, base_ckpt.path)


def common_last_token(tokenizer, prompts: list[str], marks) -> str | None:
    """The token every prompt ends in, if they all end in the same one (its text), else None."""
    from mixcli import tokens

    last = {tuple(tokens.encode(tokenizer, p, marks)[-1:]) for p in prompts}
    if len(last) != 1 or not next(iter(last)):
        return None
    return tokenizer.convert_tokens_to_string(tokenizer.convert_ids_to_tokens(list(next(iter(last)))))


def compute(mode: str, base_ckpt, tokenizer, positive, negative, layers: int, dtype: str,
            places: tuple = ("residual",), where: str = "") -> tuple[dict, dict]:
    """``({place: routers}, {place: {layer: condition number}})`` of a prompt-based mode
    (places of :data:`PLACES`); the second names the ``hidden`` layers whose degenerate rows
    were replaced by ``hidden_avg`` rows (:func:`repair_degenerate`). The hidden modes load
    the base model in ``dtype`` (freed afterwards); ``cheap_embed`` has only the residual form."""
    import torch

    from mixcli import tokens

    marks = specials_of(base_ckpt, tokenizer)
    every = [p for group in (*positive, *negative) for p in group]
    tokens.warn_surprises(tokenizer, every, [tokens.encode(tokenizer, p, marks) for p in every],
                          f"{where}: router prompts", limit=3)
    if mode == "cheap_embed":
        from mixcli.architecture import layout_of

        name = next(n for n in layout_of(base_ckpt.config).embeddings if n in base_ckpt.tensors)
        embeddings = base_ckpt.tensor(name)
        routers = cheap_embed_routers(embeddings, tokenizer, positive, negative, layers, marks)
        base_ckpt.release(name)
        return {"residual": routers}, {}
    import transformers

    from mixcli.loading import from_pretrained

    model = from_pretrained(transformers.AutoModelForCausalLM, base_ckpt.path, f"{where}: gate_mode '{mode}'",
                            dtype=getattr(torch, dtype))
    try:
        found = hidden_routers(model, tokenizer, positive, negative, places, marks)
    finally:
        del model
    if mode == "hidden_avg":
        return {place: found[place, "avg"] for place in places}, {}
    routers, repaired = {}, {}
    for place in places:
        routers[place], fixed = repair_degenerate(found[place, "last"], found[place, "avg"])
        if fixed:
            repaired[place] = fixed
    return routers, repaired


def nearly_parallel(routers) -> list[int]:
    """Layers whose router matrix has a condition number above 5: the experts' prompts give
    similar states there, so routing barely tells the experts apart."""
    return [layer for layer, cond in enumerate(condition_numbers(routers)) if cond > 5]
