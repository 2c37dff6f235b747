"""we_moe: Weight-Ensembling MoE (Tang et al., arXiv 2402.00433; spec weight-ensembling.md §2).

    [models]
    base = "zoo/vision/base"          # the pretrained backbone
    occlude_top = "zoo/vision/occlude_top"        # fine-tuned experts (task folders with head + data for [adapt])
    occlude_bottom = "zoo/vision/occlude_bottom"

    [method]
    name = "we_moe"
    base = "base"
    init_lambda = 0.3                 # router's last bias: the module starts as task arithmetic
    router_hidden_layers = 2

Non-MLP tensors are task arithmetic ``θ0 + λ_shared Σ τ_i``; every MLP found in the backbone
(or those whose module path contains one of ``modules``) becomes the pretrained MLP plus the
routed sum of its task vectors, routed per sample (tokens averaged). Add an ``[adapt]`` table
(or run ``mixcli adapt``) to train the routers by test-time entropy minimisation.
"""

from __future__ import annotations

from dataclasses import dataclass

from mixcli import Upscaler, param

ADAPT_SECTION = "adapt"


@dataclass
class Params:
    init_lambda: float = param(0.3, help="router bias at init = task-arithmetic scaling λ")
    shared_lambda: float | None = param(None, help="λ of the task-arithmetic merge of the non-upscaled "
                                                   "tensors (attention, norms, embeddings); default init_lambda")
    router_hidden_layers: int = param(2, help="router depth: 0 (constant), 1 (linear) or 2 (MLP of width d)",
                                      min=0, max=2)
    router_std: float = param(0.01, help="std of the routers' initial weights (0: exactly task arithmetic)",
                              min=0)
    batch_reduce: bool = param(False, help="inference routing: false = per sample (the paper's intent), "
                                           "true = one merge per batch")
    modules: list = param([], help="upscale only blocks whose module path contains one of these strings "
                                   "(default: every MLP)")
    upscale_attn: bool = param(False, help="also upscale every self-attention block (q/k/v/out projections): "
                                           "for fully fine-tuned experts whose skill lives partly in attention")


def block_kinds(params) -> tuple:
    """Block kinds the family upscales: the MLPs, plus self-attention when asked."""
    return ("mlp", "attention") if params["upscale_attn"] else ("mlp",)


def build(context):
    from . import adapt
    from .construction import Spec, plan

    out = plan(context, Spec("we_moe", kinds=block_kinds(context.params)))
    adapt.attach(out, context)
    return out


METHOD = Upscaler(
    name="we_moe",
    summary="Weight-ensembling MoE: MLPs become pretrained MLP + routed task vectors (per-sample routing)",
    build=build, params=Params, min_inputs=2, sections=(ADAPT_SECTION,), base="required",
)
