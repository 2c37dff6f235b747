"""moe_merge: N fine-tuned dense models sharing a base become one Mixtral; expert i's MLP
(and, with ``modules``, its q/k/v/o projections) is expert slot i (mergekit-moe semantics,
Branch-Train-MiX arXiv 2403.07816).

    [models]
    base = "models/base"
    math = { path = "models/math", positive_prompts = ["add:12+5="] }
    code = { path = "models/code", prompts_file = "prompts/code.jsonl" }
    [method]
    name = "moe_merge"
    base = "base"
    experts = ["math", "code"]        # slot order; default: every model but the base
    experts_per_token = 2
    gate_mode = "hidden"              # hidden, hidden_avg, hidden_last, cheap_embed, random, uniform_random
    modules = ["mlp", "q_proj"]
    stem = "base"                     # or "average", or a merge method with stem_params

Non-expert tensors come from the stem. Prompt-based gate modes run the base model on every
expert's prompts (a few at a time) when the first router is written, not while planning.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from mixcli import MixcliError, Upscaler, param

from . import _common, _prompts
from ._build import Recipe, build_plan
from .routers import GATE_MODES, PROMPT_MODES, RANDOM_SCALE
from .tune import tuned_output


@dataclass
class Params:
    experts: list = param([], help="model names of the expert slots, in order (default: every model but "
                                   "the base); list the base too to make its MLP an expert")
    experts_per_token: int = param(2, help="experts each token is routed to (k)", min=1)
    gate_mode: str = param("hidden", help="router initialisation (see the mixcli-moe README)", choices=GATE_MODES)
    scale: float = param(RANDOM_SCALE, help="std of gate_mode = \"random\" routers, N(0, scale^2) (Llama's "
                         "initializer_range); 1.0 is mergekit's N(0, 1) draw", min=0.0,
                         min_exclusive=True)
    hidden_source: str = param("router_input", help="hidden modes: read the states each router sees "
                               "(router_input: the MLP input after post_attention_layernorm, the attention "
                               "input for q/k/v) or the residual stream entering the layer (residual: "
                               "mergekit)", choices=("router_input", "residual"))
    hidden_dtype: str = param("bfloat16", help="dtype of the base's forward passes for hidden/hidden_avg "
                              "(mergekit: bfloat16)", choices=("bfloat16", "float32", "float16"))
    modules: list = param(["mlp"], help="what becomes experts: mlp, q_proj, k_proj, v_proj, o_proj")
    layers: list = param([], help="layers to mix (default all); a stock Mixtral gets the base's MLP in "
                                  "every slot elsewhere")
    stem: str = param("base", help="non-expert tensors: base, average, or a merge method name (ties, "
                                   "task_arithmetic, ...)")
    stem_params: dict = param({}, help="parameters of the stem merge method, e.g. {density = 0.5}")
    layout: str = param("", help="tensor layout: v5 (fused experts) or v4 (per expert); default: the "
                        "installed transformers'", choices=("", "v4", "v5"))
    prompt_field: str = param("prompt", help="column holding the prompts in prompts files")
    max_prompts: int = param(0, help="read at most this many prompts from each prompts file (0 = all)", min=0)
    allow_repeated_experts: bool = param(False, help="allow every slot to come from the same model "
                                         "(useless without router tuning)")
    positive_prompts: list = param([], per_model=True, help="prompts this expert should handle")
    negative_prompts: list = param([], per_model=True, help="prompts this expert should not handle")
    prompts_file: str = param("", per_model=True, file=True, help="data set file of positive prompts (.jsonl/.csv/"
                              ".parquet/.txt)")
    negative_prompts_file: str = param("", per_model=True, file=True, help="data set file of negative prompts")
    noise_scale: float = param(0.0, per_model=True, help="std of seeded Gaussian noise added to the "
                               "expert's MLP", min=0.0)
    residual_scale: float = param(1.0, per_model=True, help="multiplies the expert's down_proj")


def build(context):
    project = context.project
    where = f"{project.where}: [method]"
    p = context.params
    if project.base is None:
        raise MixcliError(f"{where}: base is missing; name the model donating the shared weights and tokenizer "
                          "(base = \"...\")")
    experts = list(p["experts"]) or [name for name in context.models if name != project.base]
    for name in experts:
        if not isinstance(name, str) or name not in context.models:
            raise MixcliError(f"{where}: experts lists '{name}', which is not a model of [models]")
    if len(set(experts)) == 1 and len(experts) > 1 and not p["allow_repeated_experts"]:
        raise MixcliError(f"{where}: every expert slot is model '{experts[0]}'; identical experts are useless "
                          "without router tuning (use moe_upcycle, or set allow_repeated_experts = true)")
    if len(set(experts)) < len(experts) and not p["allow_repeated_experts"]:
        repeated = next(n for n, c in Counter(experts).items() if c > 1)
        raise MixcliError(f"{where}: model '{repeated}' fills several expert slots; set allow_repeated_experts "
                          "= true if that is intended")
    mp = context.model_params
    positive, negative = [], []
    if p["gate_mode"] in PROMPT_MODES:
        for name in experts:
            model_where = project.models[name].where
            pos = _prompts.gather(mp[name]["positive_prompts"], mp[name]["prompts_file"], project.file.parent,
                                  p["prompt_field"], p["max_prompts"], model_where)
            neg = _prompts.gather(mp[name]["negative_prompts"], mp[name]["negative_prompts_file"],
                                  project.file.parent, p["prompt_field"], p["max_prompts"], model_where)
            if not pos:
                raise MixcliError(f"{model_where}: expert '{name}' has no positive_prompts; gate_mode "
                                  f"'{p['gate_mode']}' needs prompts for every expert (positive_prompts = [...] "
                                  "or prompts_file = \"...\")")
            positive.append(pos)
            negative.append(neg)
        if len(experts) > 1 and len({(tuple(a), tuple(b)) for a, b in zip(positive, negative)}) == 1:
            raise MixcliError(f"{where}: every expert has the same prompts; the routers could not tell the "
                              "experts apart")
    recipe = Recipe(base=project.base, experts=experts, k=p["experts_per_token"],
                    modules=_common.modules(p["modules"], where), layers=_common.layers(p["layers"], where),
                    layout=p["layout"], gate_mode=p["gate_mode"], scale=p["scale"], hidden_dtype=p["hidden_dtype"],
                    hidden_source=p["hidden_source"], stem=p["stem"],
                    stem_params=dict(p["stem_params"]), noise=[mp[n]["noise_scale"] for n in experts],
                    residual=[mp[n]["residual_scale"] for n in experts], positive=positive, negative=negative,
                    aux_loss_coef=_common.aux_loss_coef(context))
    return build_plan(context, recipe, "moe_merge")


METHOD = Upscaler(
    name="moe_merge",
    summary="Merge N fine-tuned dense models into a Mixtral, each one's MLP (and q/k/v) an expert",
    build=build,
    params=Params,
    min_inputs=2,
    sections=("tune",),
    final_output=tuned_output,
    base="required",
    example={"positive_prompts": ["a prompt the {model} expert should handle"]},
)
