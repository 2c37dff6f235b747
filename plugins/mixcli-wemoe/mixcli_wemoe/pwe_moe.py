"""pwe_moe: Pareto-driven weight-ensembling MoE (arXiv 2406.09770; spec weight-ensembling.md §5).

    [method]
    name = "pwe_moe"
    base = "base"
    upscale_mlp = true
    upscale_attn = true
    router_hidden_layers = 2      # Linear(n→2n) → ReLU → Linear(2n→n)

    [adapt]
    objective = "ls"              # or "epo"
    max_steps = 8000
    lr = 1e-5

Every upscaled block's router reads a *preference vector* ``p`` over the tasks instead of the
hidden states: ``θ[m](p) = θ0[m] + Σ_i router_m(p)_i τ_i[m]`` (one merge per preference, shared
by the whole batch). Routers train on each task's labeled **train** split with linear
scalarization ``Σ p_i L_i`` or EPO, ``p ~ Dirichlet(α)`` per step. At inference
``model.set_preference(p)`` picks a point of the Pareto front and ``model.merge_and_unload()``
collapses the model into a plain backbone for that preference.
"""

from __future__ import annotations

from dataclasses import dataclass

from mixcli import MixcliError, Upscaler, param

from .we_moe import ADAPT_SECTION


@dataclass
class Params:
    init_lambda: float = param(0.3, help="router's last bias at init (task arithmetic λ)")
    shared_lambda: float | None = param(None, help="λ of the non-upscaled tensors; default init_lambda")
    router_hidden_layers: int = param(2, help="router depth: 1 (Linear n→n) or 2 (n→2n→n)", min=1, max=2)
    router_std: float = param(0.01, help="std of the routers' initial weights", min=0)
    upscale_mlp: bool = param(True, help="upscale every MLP block")
    upscale_attn: bool = param(True, help="upscale every self-attention block")
    modules: list = param([], help="upscale only blocks whose module path contains one of these strings")


def build(context):
    from . import adapt
    from .construction import Spec, plan

    p = context.params
    kinds = tuple(k for k, on in (("mlp", p["upscale_mlp"]), ("attention", p["upscale_attn"])) if on)
    if not kinds:
        raise MixcliError(f"{context.project.where}: [method] upscale_mlp and upscale_attn are both false; "
                          "pwe_moe needs at least one kind of block")
    n = len(context.models) - 1
    out = plan(context, Spec("pwe_moe", kinds=kinds, router_input="preference",
                             config={"router_hidden_size": 2 * n}))
    adapt.attach(out, context)
    return out


METHOD = Upscaler(
    name="pwe_moe",
    summary="PWE-MoE: routers read a preference over the tasks; trained with LS or EPO (Pareto set)",
    build=build, params=Params, min_inputs=2, sections=(ADAPT_SECTION,), base="required",
)
