"""A transformers backbone seen by the methods that replace its Linears (WE-MoE family,
rank-one MoE, SMILE): the structure built from a config on the meta device, its Linears and
MLP / attention blocks found by module structure, and the renaming of a checkpoint's tensor
names to the in-memory ones.

A block is a module holding Linears at known relative paths: the *entry* Linears read the
block input (a router reads it too), the others follow. Patterns are tried in order on
every module; a Linear belongs to at most one block. Importing this module does not import
torch.
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


def get_module(module, path: str):
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
            found = [get_module(module, p) for p in paths]
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


def find_linears(model, filters=()) -> list[str]:
    """Module paths of every ``nn.Linear`` of ``model`` whose path contains one of
    ``filters`` (all when empty), in module order."""
    from torch import nn

    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and (not filters or any(f in name for f in filters))]


def meta_backbone(config: dict, where: str, auto_class: str = "AutoModel", kwargs: dict | None = None):
    """The model ``auto_class`` builds from ``config`` (a config.json dict) with the model
    class's ``kwargs`` (e.g. ``add_pooling_layer=False``), on the meta device: structure and
    names, no memory."""
    import torch
    import transformers

    from .errors import MixcliError, first_line

    data = dict(config)
    model_type = data.pop("model_type", None)
    try:
        cfg = transformers.AutoConfig.for_model(model_type, **data)
        with torch.device("meta"):
            return getattr(transformers, auto_class).from_config(cfg, **(kwargs or {}))
    except Exception as error:
        raise MixcliError(f"{where}: transformers cannot build a model of type '{model_type}' "
                          f"({first_line(error)})") from None


def renamer(backbone):
    """checkpoint key -> in-memory key, as ``from_pretrained`` renames (transformers 5 keeps legacy
    names on disk, e.g. ViT's ``encoder.layer.0.intermediate.dense`` for ``layers.0.mlp.fc1``)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # transformers without conversion mappings: names are stored as they are
        return lambda key, meta: (key, None)
    conversions = get_model_conversion_mapping(backbone)
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    prefix = getattr(backbone, "base_model_prefix", None) or None
    return lambda key, meta: rename_source_key(key, renamings, converters, prefix, meta)


def rename_key(rename, key, meta):
    try:
        return rename(key, meta)
    except Exception:  # a converter that cannot parse this key: leave the name alone
        return key, None


def checkpoint_names(backbone, ckpt, where: str, rename=None, needed=None) -> dict[str, str]:
    """In-memory state-dict name -> the checkpoint's tensor name, for every name of
    ``needed`` (default: the whole state dict); a missing one is a one-line error."""
    from .errors import MixcliError

    rename = rename or renamer(backbone)
    meta = backbone.state_dict()
    mapping = {}
    for key in ckpt.tensors:
        new, converter = rename_key(rename, key, meta)
        if converter is None and new in meta:
            mapping.setdefault(new, key)
    for key in meta if needed is None else needed:
        if key not in mapping:
            raise MixcliError(f"{where}: model '{ckpt.name}' has no tensor for '{key}' (the backbone built from "
                              "its config.json expects it); is it a save_pretrained folder of that architecture?")
    return mapping
