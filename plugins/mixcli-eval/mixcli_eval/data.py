"""Loading a causal LM and its tokenizer for the language evaluators (data files are read by
:mod:`mixcli.datafiles`)."""

from __future__ import annotations


def load_causal_lm(context, dtype: str):
    """The context's model (a folder or a resident model) as a causal LM in ``dtype`` on its
    device, and its tokenizer, with a pad token."""
    model = context.load_model("AutoModelForCausalLM", dtype)
    tokenizer = context.load_tokenizer()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
