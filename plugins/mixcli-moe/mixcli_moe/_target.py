"""The output architecture, decided from configs and headers alone: the Mixtral (or
mixcli_mixllama) config built from a Llama/Mistral config, and the tensor names of the
transformers 4.x (per expert) and 5.x (fused) layouts."""

from __future__ import annotations

import copy
from importlib import metadata

from mixcli import MixcliError
from mixcli.plan import set_dtype

MODEL_TYPE = "mixcli_mixllama"  # the attention-expert architecture (modeling_mixllama)
MODULES = ("mlp", "q_proj", "k_proj", "v_proj", "o_proj")
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
FLAGS = {"mlp": "moe_mlp", "q_proj": "moe_query", "k_proj": "moe_key", "v_proj": "moe_value",
         "o_proj": "moe_output"}
MLP_PARTS = ("gate_proj", "up_proj", "down_proj")
MOE_PARTS = (".experts.", ".router.", ".gate.weight")  # in names of the tensors this plugin makes
V4_PARTS = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
INPUT_TYPES = ("llama", "mistral")
# Llama/Mistral fields a Mixtral has no use for (their value is checked before they are dropped)
DROPPED = ("pretraining_tp", "mlp_bias", "attention_bias", "architectures", "model_type",
           "transformers_version", "auto_map", "_name_or_path", "layer_types")
UNREPRESENTABLE = ("attention_bias", "mlp_bias")
DEFAULT_AUX_LOSS_COEF = 0.01


def native_layout() -> str:
    """The layout the installed transformers writes: "v5" (fused experts) or "v4"."""
    try:
        major = int(metadata.version("transformers").split(".")[0])
    except (metadata.PackageNotFoundError, ValueError):
        return "v5"
    return "v5" if major >= 5 else "v4"


def check_input_config(config: dict, name: str, where: str) -> None:
    model_type = config.get("model_type")
    if model_type not in INPUT_TYPES:
        raise MixcliError(f"{where}: model '{name}' has model_type '{model_type}'; MoE mixing takes "
                          f"{' or '.join(INPUT_TYPES)} models (a Mixtral cannot represent others)")
    for key in UNREPRESENTABLE:
        if config.get(key):
            raise MixcliError(f"{where}: model '{name}' has {key} = true in config.json; a Mixtral has no "
                              "biases there, so this model cannot be converted")
    if config.get("hidden_act") is None and config.get("hidden_activation") is not None:
        raise MixcliError(f"{where}: model '{name}' sets hidden_activation, not hidden_act; unsupported")


def output_config(base: dict, *, experts: int, k: int, dtype: str, modules: tuple, layers: list[int] | None,
                  aux_loss_coef: float = DEFAULT_AUX_LOSS_COEF) -> dict:
    """The output config.json: a stock Mixtral for MLP-only mixing, else mixcli_mixllama."""
    out = {key: copy.deepcopy(value) for key, value in base.items() if key not in DROPPED}
    out.update(architectures=["MixtralForCausalLM"], model_type="mixtral", num_local_experts=experts,
               num_experts_per_tok=k, sliding_window=None, router_aux_loss_coef=aux_loss_coef,
               output_router_logits=False, router_jitter_noise=0.0)
    if is_custom(modules, layers, base):
        out.update(architectures=["MixLlamaForCausalLM"], model_type=MODEL_TYPE,
                   moe_layer_idx=None if layers is None else sorted(layers),
                   mixcli_plugin="mixcli-moe")
        for module, flag in FLAGS.items():
            out[flag] = module in modules
    set_dtype(out, dtype)
    return out


def is_custom(modules: tuple, layers: list[int] | None, base: dict) -> bool:
    """Attention experts need the mixcli_mixllama architecture; MLP-only mixing does not."""
    return any(m in ATTENTION for m in modules)


class Names:
    """Tensor names of the output, by layer."""

    def __init__(self, layout: str, custom: bool):
        self.layout, self.custom = layout, custom

    def router(self, layer: int) -> str:
        block = "block_sparse_moe" if self.layout == "v4" else "mlp"
        return f"model.layers.{layer}.{block}.gate.weight"

    def fused(self, layer: int) -> tuple[str, str]:
        return (f"model.layers.{layer}.mlp.experts.gate_up_proj", f"model.layers.{layer}.mlp.experts.down_proj")

    def expert(self, layer: int, expert: int, part: str) -> str:
        return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{V4_PARTS[part]}.weight"

    @staticmethod
    def attention_expert(layer: int, proj: str, expert: int) -> str:
        return f"model.layers.{layer}.self_attn.{proj}.experts.{expert}.weight"

    @staticmethod
    def attention_router(layer: int, proj: str) -> str:
        return f"model.layers.{layer}.self_attn.{proj}.router.weight"

    @staticmethod
    def dense(layer: int, part: str) -> str:
        return f"model.layers.{layer}.mlp.{part}.weight"

    @staticmethod
    def attention(layer: int, proj: str) -> str:
        return f"model.layers.{layer}.self_attn.{proj}.weight"


def to_v5(name: str) -> str:
    """A 4.x-layout name as transformers 5.x names the parameter (experts collapse to fused)."""
    if ".block_sparse_moe." not in name:
        return name
    name = name.replace(".block_sparse_moe.", ".mlp.")
    head, sep, tail = name.partition(".experts.")
    if not sep:
        return name
    part = tail.split(".")[1]
    return f"{head}.experts.{'down_proj' if part == 'w2' else 'gate_up_proj'}"


def check_names(config: dict, written: set[str], layout: str, where: str = "", base: str = "") -> None:
    """The written names equal what the target class expects (built on the meta device). A
    name outside the experts and routers comes from the base, so a difference there is the
    base's: a tensor its architecture needs is not in its files, or one is there that no
    Llama/Mistral has."""
    import torch
    import transformers

    if config["model_type"] == MODEL_TYPE:
        from .modeling_mixllama import MixLlamaConfig, MixLlamaForCausalLM

        model_class, cfg = MixLlamaForCausalLM, MixLlamaConfig(**config)
    else:
        model_class, cfg = transformers.MixtralForCausalLM, transformers.MixtralConfig(**config)
    if (layout == "v5") != (native_layout() == "v5"):
        return  # the class of the installed transformers names the other layout
    with torch.device("meta"):
        model = model_class(cfg)
    expected = set(model.state_dict())
    if config.get("tie_word_embeddings"):
        expected.discard("lm_head.weight")
    got = {to_v5(name) for name in written}
    missing, unexpected = sorted(expected - got), sorted(got - expected)
    from_base = [name for name in missing + unexpected if not any(part in name for part in MOE_PARTS)]
    if from_base:
        name = from_base[0]
        raise MixcliError(f"{where}: model '{base}' has no tensor '{name}', which its config.json needs; re-save "
                          "the complete model with save_pretrained" if name in missing else
                          f"{where}: model '{base}' has a tensor '{name}' that its architecture does not use "
                          "(a Mixtral would have no place for it); remove it or re-save the model")
    if missing or unexpected:  # a bug in this plugin, not a user mistake
        raise RuntimeError(f"mixcli-moe: output names disagree with {model_class.__name__}: missing "
                           f"{missing[:3]}, unexpected {unexpected[:3]}")


def parameter_counts(tensors, names: Names, experts: int, k: int) -> dict:
    """stem / experts / routers / total / active parameter counts of the output tensors."""
    from math import prod

    counts = {"stem": 0, "experts": 0, "routers": 0}
    for tensor in tensors:
        kind = tensor.details.get("kind", "stem")
        counts[{"expert": "experts", "router": "routers"}.get(kind, "stem")] += prod(tensor.shape)
    counts["total"] = sum(counts.values())
    counts["active"] = counts["stem"] + counts["routers"] + counts["experts"] * k // experts
    counts.update(num_experts=experts, experts_per_token=k)
    return counts
