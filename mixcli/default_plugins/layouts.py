"""The built-in architecture layout: the tensor names transformers models use, for any model
type no plugin describes (Llama, Mistral, Qwen2, GPT-2, BERT, ViT, ...)."""

from __future__ import annotations

from mixcli import ArchitectureLayout, hookimpl

TRANSFORMERS = ArchitectureLayout(
    name="transformers",
    summary="decoder and encoder stacks named layers/layer/h/blocks.N; lm_head tied to the input embedding",
    model_types=(),  # the fallback for every model type
    layer_pattern=r"(^|\.)(layers|layer|h|blocks)\.(?P<index>\d+)\.",
    # where a tied model keeps the embedding that serves as its lm_head
    embeddings=("model.embed_tokens.weight", "transformer.wte.weight", "model.decoder.embed_tokens.weight",
                "embed_tokens.weight"),
    head="lm_head.weight",
    pre_layer_hints=("embed", "wte", "wpe", "patch", "position", "cls_token", "mask_token"),
)


@hookimpl
def register_architecture_layouts(register):
    register(TRANSFORMERS)
