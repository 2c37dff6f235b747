"""Reading evaluation data from local files with `datasets`."""

from __future__ import annotations

from pathlib import Path

from mixcli import MixcliError
from mixcli.datafiles import FORMATS, column, load_rows  # noqa: F401  (this module's API)


def load_causal_lm(folder: Path, dtype: str, device: str):
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype))
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer
