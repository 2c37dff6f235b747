"""moe_upcycle: one dense Llama/Mistral becomes a Mixtral whose experts all equal its MLP
(sparse upcycling, arXiv 2212.05055).

    [models]
    dense = "models/llama"
    [method]
    name = "moe_upcycle"
    num_experts = 4
    experts_per_token = 2
    gate_mode = "uniform_random"     # or "random"
    modules = ["mlp"]                # add "q_proj", "k_proj", "v_proj", "o_proj" for attention experts

Every non-MLP tensor is copied; with identical experts any finite router gives the dense
model's outputs. ``noise_scale`` adds seeded Gaussian noise to every expert (each its own
draw) to break the symmetry before router tuning.
"""

from __future__ import annotations

from dataclasses import dataclass

from mixcli import Upscaler, param

from . import _common
from ._build import Recipe, build_plan
from .routers import RANDOM_SCALE
from .tune import tuned_output


@dataclass
class Params:
    num_experts: int = param(4, help="experts per MoE layer", min=1)
    experts_per_token: int = param(2, help="experts each token is routed to (k)", min=1)
    gate_mode: str = param("uniform_random", help="router initialisation: random (N(0, scale^2), mergekit's "
                           "seeded draw times scale) or uniform_random (U(-1/sqrt(H), 1/sqrt(H)))",
                           choices=("random", "uniform_random"))
    scale: float = param(RANDOM_SCALE, help="std of gate_mode = \"random\" routers (Llama's initializer_range); "
                         "1.0 is mergekit's N(0, 1) draw", min=0.0,
                         min_exclusive=True)
    modules: list = param(["mlp"], help="what becomes experts: mlp, q_proj, k_proj, v_proj, o_proj")
    layers: list = param([], help="layers to mix (default all); others keep a dense MLP / projections")
    noise_scale: float = param(0.0, help="std of the seeded Gaussian noise added to each expert's MLP", min=0.0)
    layout: str = param("", help="tensor layout: v5 (fused experts) or v4 (per expert); default: the "
                        "installed transformers'", choices=("", "v4", "v5"))


def build(context):
    (name, _), = context.models.items()
    where = f"{context.project.where}: [method]"
    p = context.params
    count = p["num_experts"]
    recipe = Recipe(base=name, experts=[name] * count, k=p["experts_per_token"],
                    modules=_common.modules(p["modules"], where), layers=_common.layers(p["layers"], where),
                    layout=p["layout"], gate_mode=p["gate_mode"], scale=p["scale"], noise=[p["noise_scale"]] * count,
                    aux_loss_coef=_common.aux_loss_coef(context))
    return build_plan(context, recipe, "moe_upcycle")


METHOD = Upscaler(
    name="moe_upcycle",
    summary="Upcycle one dense Llama/Mistral into a Mixtral with identical experts",
    build=build,
    params=Params,
    min_inputs=1,
    max_inputs=1,
    sections=("tune",),
    final_output=tuned_output,
)
