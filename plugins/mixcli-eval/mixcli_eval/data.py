"""Loading a causal LM and its tokenizer for the language evaluators (data files are read by
:mod:`mixcli.datafiles`)."""

from __future__ import annotations

from pathlib import Path


def load_causal_lm(folder: Path, dtype: str, device: str):
    import torch

    from mixcli.evaluation import load_model, load_tokenizer

    model = load_model("AutoModelForCausalLM", folder, dtype=getattr(torch, dtype))
    tokenizer = load_tokenizer(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer
