"""The scaled decoder: a stock decoder-only architecture whose layer ``k`` receives the residual
stream multiplied by ``config.layer_input_scales[k]``, for layer paths with input scales (DFS).

The scales cannot be folded into weights: in a pre-norm transformer the norm ignores a scale,
but the residual stream carries it. Each variant subclasses the stock config and causal-LM
classes (same tensor names, same cache), under its own model type ``mixcli_dfs_<base>``, and
scales a layer's input with a forward pre-hook. The layers are fresh modules numbered
``0..L-1``, so repeated source layers keep distinct KV-cache slots. mixcli registers the
variants with transformers' Auto classes (``register_architectures``) whenever it loads a
model, so a saved variant loads with ``AutoModelForCausalLM.from_pretrained`` once this plugin
is installed and :func:`mixcli.plugins.register_architectures` has run.
"""

from __future__ import annotations

import transformers

PREFIX = "mixcli_dfs_"
# stock decoders whose causal LM keeps its layers in ``model.layers`` and feeds each the
# residual stream as its first argument
BASES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "gemma": "Gemma",
         "gemma2": "Gemma2", "phi3": "Phi3", "olmo2": "Olmo2", "granite": "Granite"}


def variant_type(base_type: str) -> str:
    return PREFIX + base_type


def supported(base_type: str) -> bool:
    return base_type in BASES and base_type in transformers.CONFIG_MAPPING


class _ScaleInput:
    """Forward pre-hook: multiplies a decoder layer's hidden states by a constant."""

    def __init__(self, scale: float):
        self.scale = scale

    def __call__(self, module, args, kwargs):
        if args:
            return (args[0] * self.scale, *args[1:]), kwargs
        kwargs["hidden_states"] = kwargs["hidden_states"] * self.scale
        return args, kwargs


class ScaledDecoderMixin:
    """Scales each decoder layer's input by ``config.layer_input_scales``."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        layers = self.model.layers
        scales = list(getattr(config, "layer_input_scales", None) or [1.0] * len(layers))
        if len(scales) != len(layers):
            raise ValueError(f"layer_input_scales has {len(scales)} entries but the model has {len(layers)} layers")
        for layer, scale in zip(layers, scales):
            if float(scale) != 1.0:
                layer.register_forward_pre_hook(_ScaleInput(float(scale)), with_kwargs=True)


def _variants() -> dict[str, tuple[type, type]]:
    """model type -> (config class, causal LM class), for the bases this transformers has."""
    made = {}
    for base, stem in BASES.items():
        config_base = getattr(transformers, f"{stem}Config", None)
        model_base = getattr(transformers, f"{stem}ForCausalLM", None)
        if config_base is None or model_base is None:
            continue
        model_type = variant_type(base)
        config_class = type(f"MixcliDfs{stem}Config", (config_base,), {
            "model_type": model_type, "__module__": __name__,
            "__doc__": f"{stem}Config with layer_input_scales (a mixcli layer path)."})
        model_class = type(f"MixcliDfs{stem}ForCausalLM", (ScaledDecoderMixin, model_base), {
            "config_class": config_class, "__module__": __name__,
            "__doc__": f"{stem}ForCausalLM whose layer k gets its input times layer_input_scales[k]."})
        globals()[config_class.__name__] = config_class  # importable by name (pickling)
        globals()[model_class.__name__] = model_class
        made[model_type] = (config_class, model_class)
    return made


VARIANTS = _variants()


def register(register_architecture) -> None:
    """Register every variant (the ``register_architectures`` hook's callback)."""
    for model_type, (config_class, model_class) in VARIANTS.items():
        register_architecture(model_type, config_class, {"AutoModelForCausalLM": model_class})
