"""Finding the blocks to upscale in any transformers backbone, by module structure.

A block is a module holding Linears at known relative paths: the *entry* Linears read the
block input (the router reads it too), the others follow. Patterns are tried in order on
every module; a Linear belongs to at most one block.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MLP_PATTERNS = (
    (("gate_proj", "up_proj"), ("down_proj",)),  # Llama, Mistral, Qwen
    (("w1", "w3"), ("w2",)),  # Mixtral-style experts
    (("wi_0", "wi_1"), ("wo",)),  # T5 gated
    (("wi",), ("wo",)),  # T5
    (("fc1",), ("fc2",)),  # CLIP, OPT-style MLPs
    (("intermediate.dense",), ("output.dense",)),  # ViT, BERT layers
    (("dense_h_to_4h",), ("dense_4h_to_h",)),  # GPT-NeoX, Falcon
    (("fc_in",), ("fc_out",)),  # GPT-J
    (("up_proj",), ("down_proj",)),  # ungated MLPs
)
ATTENTION_PATTERNS = (
    (("q_proj", "k_proj", "v_proj"), ("o_proj",)),
    (("q_proj", "k_proj", "v_proj"), ("out_proj",)),
    (("attention.query", "attention.key", "attention.value"), ("output.dense",)),  # ViT, BERT
    (("q", "k", "v"), ("o",)),  # T5
)
LAYER_INDEX = re.compile(r"\.(\d+)(\.|$)")


@dataclass
class Block:
    name: str  # module path of the block ("encoder.layer.3")
    kind: str  # "mlp" or "attention"
    entries: list[str]  # full module paths of the Linears reading the block input
    others: list[str]
    layer: int  # transformer layer index (for position encodings), 0 when unknown

    @property
    def linears(self) -> list[str]:
        return self.entries + self.others


def _get(module, path: str):
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def find_blocks(model, kinds=("mlp",), filters=()) -> list[Block]:
    """Blocks of ``model`` of the given kinds, whose name contains one of ``filters`` (all
    when empty), in module order."""
    from torch import nn

    patterns = [("mlp", p) for p in MLP_PATTERNS if "mlp" in kinds]
    patterns += [("attention", p) for p in ATTENTION_PATTERNS if "attention" in kinds]
    claimed: set[str] = set()
    blocks = []
    for name, module in model.named_modules():
        for kind, (entries, others) in patterns:
            paths = entries + others
            found = [_get(module, p) for p in paths]
            if not all(isinstance(m, nn.Linear) for m in found):
                continue
            full = [f"{name}.{p}" if name else p for p in paths]
            if any(f in claimed for f in full):
                continue
            if filters and not any(f in name for f in filters):
                continue
            claimed.update(full)
            match = LAYER_INDEX.findall("." + name)
            layer = int(match[-1][0]) if match else 0
            blocks.append(Block(name, kind, full[:len(entries)], full[len(entries):], layer))
    return blocks
