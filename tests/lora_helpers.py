"""PEFT adapters for the tiny models, and PEFT's own merge of them: the reference the LoRA
tests compare with."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers


def make_adapter(base: Path, out: Path, seed: int = 0, scale: float = 0.05, dtype=None, resize: int | None = None,
                 tokenizer: bool = False, **config) -> Path:
    """A PEFT LoRA adapter on ``base`` with seeded random factors (both non-zero, so every
    module really changes), perturbed modules_to_save and, with ``bias``, perturbed biases."""
    import peft

    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=dtype or torch.float32)
    if resize:
        model.resize_token_embeddings(resize, mean_resizing=False)
    config.setdefault("r", 4)
    config.setdefault("lora_alpha", 8)
    peft_model = peft.get_peft_model(model, peft.LoraConfig(**config))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            trained_bias = config.get("bias", "none") != "none" and name.endswith("bias")
            if "lora_" in name or "modules_to_save" in name or trained_bias:
                noise = torch.randn(param.shape, generator=generator) * scale
                param.copy_(noise if "lora_" in name else param.float() + noise)
    peft_model.save_pretrained(out)
    if tokenizer:
        transformers.AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out


def peft_merged(base: Path, adapter: Path, dtype=None, resize: int | None = None):
    """PEFT's merge_and_unload of ``adapter`` on ``base``: the merged model."""
    import peft

    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=dtype or torch.float32)
    if resize:
        model.resize_token_embeddings(resize, mean_resizing=False)
    return peft.PeftModel.from_pretrained(model, adapter).merge_and_unload().eval()
