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


def random_draws(mode: str, groups: int, layers: int, experts: int, hidden: int, seed: int) -> list:
    """``groups`` router sets from one generator seeded with ``seed``: the first is exactly
    mergekit's ``torch.manual_seed(seed); torch.randn(L, E, H)`` (or its uniform variant)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    draws = []
    for _ in range(groups):
        if mode == "random":
            draws.append(torch.randn(layers, experts, hidden, generator=generator, dtype=torch.float32))
        else:
            scale = math.sqrt(1.0 / hidden)
            draws.append(torch.rand(layers, experts, hidden, generator=generator) * 2 * scale - scale)
    return draws


def prepare_tokenizer(tokenizer):
    """Left padding, pad = BOS (EOS without BOS, then the tokenizer's own pad, then token 0:
    padded positions are masked out, so any id does); returns the text prefixed to each prompt."""
    tokenizer.padding_side = "left"
    tokenizer.pad_token = (tokenizer.bos_token or tokenizer.eos_token or tokenizer.pad_token
                           or tokenizer.convert_ids_to_tokens(0))
    return tokenizer.bos_token or ""


def encode(tokenizer, prompts: list[str]):
    prefix = prepare_tokenizer(tokenizer)
    return tokenizer([prefix + p for p in prompts], add_special_tokens=False, padding=True, return_tensors="pt")


def _normalise(v):
    import torch

    return v / torch.clamp(torch.linalg.vector_norm(v, dim=-1, keepdim=True), min=EPS)


def prompt_states(model, tokenizer, prompts: list[str], average: bool, places: tuple = ("residual",)) -> dict:
    """``{place: [L, D]}``: mean over prompts of what a router of each layer reads, at the last
    token (``average``: masked mean over the prompt's tokens), float32 accumulation, from one
    forward pass per chunk. A place is "residual" (the stream entering the layer; D = hidden)
    or "o_proj" (the attention output entering o_proj; D = heads x head_dim)."""
    import torch

    decoder = getattr(model, model.base_model_prefix, model)
    captured: list = []
    hooks = []
    if "o_proj" in places:
        hooks = [layer.self_attn.o_proj.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
                 for layer in decoder.layers]
    totals: dict = {}
    try:
        for start in range(0, len(prompts), CHUNK):
            batch = encode(tokenizer, prompts[start:start + CHUNK])
            captured.clear()
            with torch.no_grad():
                out = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              output_hidden_states="residual" in places, use_cache=False)
            mask = batch["attention_mask"].to(torch.float32)
            for place in places:
                # hidden_states entry l enters layer l; the last is after the final layer
                states = out.hidden_states[:-1] if place == "residual" else captured
                rows = []
                for state in states:
                    state = state.to(torch.float32)
                    if average:
                        rows.append(((state * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)).sum(0))
                    else:
                        rows.append(state[:, -1].sum(0))
                chunk = torch.stack(rows)
                totals[place] = chunk if place not in totals else totals[place] + chunk
    finally:
        for hook in hooks:
            hook.remove()
    return {place: total / len(prompts) for place, total in totals.items()}


def hidden_routers(model, tokenizer, positive: list[list[str]], negative: list[list[str]], average: bool,
                   places: tuple = ("residual",)) -> dict:
    """``hidden`` / ``hidden_avg``: ``{place: R}`` with R_l[e] = normalise(m_l(P_e) - m_l(N_e))."""
    import torch

    rows: dict = {place: [] for place in places}
    for pos, neg in zip(positive, negative):
        vectors = prompt_states(model, tokenizer, pos, average, places)
        negatives = prompt_states(model, tokenizer, neg, average, places) if neg else {}
        for place in places:
            vector = vectors[place] - negatives[place] if neg else vectors[place]
            rows[place].append(_normalise(vector))
    return {place: torch.stack(found, dim=1) for place, found in rows.items()}  # each [L, E, D]


def embed_sum(embeddings, tokenizer, prompts: list[str]):
    """s(S): the sum of the embedding rows of every real token (BOS included) of every prompt."""
    import torch

    total = torch.zeros(embeddings.shape[1], dtype=torch.float32)
    for start in range(0, len(prompts), CHUNK):
        batch = encode(tokenizer, prompts[start:start + CHUNK])
        ids = batch["input_ids"][batch["attention_mask"].bool()]
        total += embeddings[ids].to(torch.float32).sum(0)
    return total


def cheap_embed_routers(embeddings, tokenizer, positive, negative, layers: int):
    """``cheap_embed``: v_e = u(P_e) - u(N_e) with u = normalised embedding sums; normalised
    again and repeated for every layer."""
    import torch

    rows = []
    for pos, neg in zip(positive, negative):
        vector = _normalise(embed_sum(embeddings, tokenizer, pos))
        if neg:
            vector = vector - _normalise(embed_sum(embeddings, tokenizer, neg))
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


def compute(mode: str, base_ckpt, tokenizer, positive, negative, layers: int, dtype: str,
            places: tuple = ("residual",), where: str = "") -> dict:
    """``{place: routers}`` of a prompt-based mode (places as in :func:`prompt_states`): for
    the hidden modes, loads the base model in ``dtype`` (freed afterwards). ``cheap_embed``
    has only the residual form."""
    import torch

    if mode == "cheap_embed":
        from mixcli.architecture import layout_of

        name = next(n for n in layout_of(base_ckpt.config).embeddings if n in base_ckpt.tensors)
        embeddings = base_ckpt.tensor(name)
        routers = cheap_embed_routers(embeddings, tokenizer, positive, negative, layers)
        base_ckpt.release(name)
        return {"residual": routers}
    import transformers

    from mixcli.loading import from_pretrained

    model = from_pretrained(transformers.AutoModelForCausalLM, base_ckpt.path, f"{where}: gate_mode '{mode}'",
                            dtype=getattr(torch, dtype))
    try:
        return hidden_routers(model, tokenizer, positive, negative, mode == "hidden_avg", places)
    finally:
        del model


def degenerate_layers(routers) -> list[int]:
    """Layers whose router matrix has a condition number above 5 (prompts too similar)."""
    import torch

    if routers.shape[1] < 2:
        return []
    return [layer for layer in range(routers.shape[0])
            if float(torch.linalg.cond(routers[layer].to(torch.float32))) > 5]
