"""Tiny seeded Llama / Mistral / Qwen2 families built locally: a base and fine-tunes of it.

All have GQA (4 heads, 2 key-value heads); Qwen2 adds q/k/v biases; ``tie`` ties the
embeddings; ``shard_size`` saves every model in several safetensors shards with an index."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

ALPHABET = "0123456789+-=*/ abcdefghijklmnopqrstuvwxyz.,:;!?"


def tokenizer():
    from mixcli_zoo.tokenizer import build_char_tokenizer

    return build_char_tokenizer(ALPHABET)


def config(arch: str = "llama", layers: int = 4, tie: bool = False, vocab: int | None = None):
    tok = tokenizer()
    common = dict(vocab_size=vocab or len(tok), hidden_size=64, intermediate_size=160,
                  num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=128, tie_word_embeddings=tie, bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if arch == "mistral":
        return transformers.MistralConfig(sliding_window=64, **common)
    if arch == "qwen2":
        return transformers.Qwen2Config(**common)
    return transformers.LlamaConfig(**common)


def save(model, folder: Path, **kwargs) -> Path:
    model.save_pretrained(folder, **kwargs)
    tokenizer().save_pretrained(folder)
    return folder


MODEL_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def build_family(root: Path, arch: str = "llama", experts: int = 2, seed: int = 0, layers: int = 4,
                 tie: bool = False, dtype=torch.float32, delta: float = 0.02,
                 shard_size: str | None = None) -> dict[str, Path]:
    """``base`` plus ``ft1``..``ftN``: the base with seeded task vectors of scale ``delta``."""
    torch.manual_seed(seed)
    cfg = config(arch, layers, tie)
    model_class = getattr(transformers, MODEL_CLASSES[arch])
    base = model_class(cfg).to(dtype).eval()
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    paths = {"base": save(base, root / "base", **kwargs)}
    generator = torch.Generator().manual_seed(seed + 1000)
    for i in range(1, experts + 1):
        expert = model_class(cfg).to(dtype).eval()
        expert.load_state_dict(base.state_dict())
        with torch.no_grad():
            for param in expert.parameters():
                noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
                param.add_((noise * delta).to(dtype))
        paths[f"ft{i}"] = save(expert, root / f"ft{i}", **kwargs)
    return paths


def load_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def logits(folder: Path, text: str = "12+34=") -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        return model(**tok(text, return_tensors="pt")).logits
