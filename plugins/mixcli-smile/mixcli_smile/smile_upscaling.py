"""smile_upscaling: a sparse mixture of low-rank experts, with no data and no training (SMILE,
arXiv 2408.10174; spec weight-ensembling.md §6, singular-merges.md §8).

    [method]
    name = "smile_upscaling"
    base = "base"
    gate_k = 1        # router rank per expert
    k = 128           # expert rank (-1: dense task vectors)
    top_k = 1         # experts per token

Every Linear of the base model (a ViT, a CLIP vision tower, a Llama / Mistral / Qwen2
decoder; ``lm_head`` excepted), or those whose path contains one of ``modules``, becomes a
SMILE Linear: the pretrained weight, shared, plus one expert per fine-tune, the top ``k``
singular components of its task vector ``ΔW_i = U S Vᵀ`` (``u = U_k``, ``svh = S_k V_kᵀ``, and
``δb_i``), and a router whose logit for expert i is ``‖V_{i,gate_k}ᵀ x‖``. Each token takes its
``top_k`` experts by softmax, renormalised. Other tensors are the base's (the fine-tunes'
average with ``average_experts``). SVDs run in float32, one Linear at a time, each task
vector decomposed once for its router rows and its expert.

Planning reads no weights, so a Linear that no fine-tune changes is not left out as
FusionBench does: its experts come out exactly zero (it computes the pretrained Linear) and
the merge warns, naming it; exclude such Linears with ``modules``.
"""

from __future__ import annotations

from dataclasses import dataclass

from mixcli import MixcliError, Upscaler, param

SVD_INPUTS = 3  # float32 copies held while one task vector is decomposed: delta, U, Vᵀ (square at worst)


@dataclass
class Params:
    gate_k: int = param(1, help="router rank: top right-singular vectors of each task vector the router "
                                "projects a token onto (at most d_in, or min(d_out, d_in) without full_matrices)",
                        min=1)
    k: int = param(128, help="rank of each expert: top singular components of its task vector (at most "
                             "min(d_out, d_in) of every upscaled Linear; -1: dense task vectors)", min=-1)
    top_k: int = param(1, help="experts each token uses (at most the number of fine-tuned models)", min=1)
    full_matrices: bool = param(True, help="full SVD for the router, so gate_k may reach into the task "
                                           "vector's null space (up to d_in)")
    routing_use_diff: bool = param(True, help="router from the SVD of the task vector W_i - W0 (false: of "
                                              "the fine-tuned weight W_i)")
    average_experts: bool = param(False, help="tensors outside the upscaled Linears are the fine-tunes' "
                                              "average (false: the base's)")
    upscaling_accelerator: str = param("cpu", help="torch device for the SVDs (cpu, or cuda when one is there)")
    modules: list = param([], help="upscale only the Linears whose module path contains one of these "
                                   "strings (empty: every Linear)")


def _check(p: dict, linears: dict, n: int, where: str, model_type: str) -> None:
    """One-line errors for parameters the chosen Linears cannot take (before anything is read)."""
    if p["k"] == 0:
        raise MixcliError(f"{where}: k = 0 keeps no component of the task vectors; use k >= 1 (low-rank "
                          "experts) or k = -1 (dense experts)")
    if p["top_k"] > n:
        raise MixcliError(f"{where}: top_k = {p['top_k']} but there are {n} fine-tuned models (experts); "
                          f"use top_k <= {n}")
    for path, (d_out, d_in) in linears.items():
        rank = min(d_out, d_in)
        gate_bound = d_in if p["full_matrices"] else rank
        if p["gate_k"] > gate_bound:
            how = "d_in" if p["full_matrices"] else "min(d_out, d_in) without full_matrices"
            raise MixcliError(f"{where}: gate_k = {p['gate_k']} is more than the {gate_bound} singular vectors of "
                              f"Linear '{path}' ({d_out}x{d_in}, {how}) of the '{model_type}' model; use gate_k "
                              f"<= {gate_bound}, or exclude that Linear with modules")
        if p["k"] > rank:
            raise MixcliError(f"{where}: k = {p['k']} is more than the rank {rank} of Linear '{path}' "
                              f"({d_out}x{d_in}) of the '{model_type}' model; use k <= {rank}, k = -1 for dense "
                              "experts, or exclude that Linear with modules")


def extra_parameters(linears: dict, n: int, gate_k: int, k: int, biased: set) -> tuple[int, int]:
    """(router, expert) parameters SMILE adds to the pretrained model, spec §6.4:
    ``n·R·d_in`` per Linear, and ``n·(K·(d_out + d_in) + d_out)`` (dense: ``n·(d_out·d_in + d_out)``),
    the ``d_out`` bias terms only for Linears with a bias."""
    router = experts = 0
    for path, (d_out, d_in) in linears.items():
        router += n * gate_k * d_in
        per_expert = k * (d_out + d_in) if k > 0 else d_out * d_in
        experts += n * (per_expert + (d_out if path in biased else 0))
    return router, experts


def describe_model(config: dict, where: str = "model"):
    """(stock meta model, its base model, its SMILE classes) for a config.json dict."""
    from mixcli.backbone import meta_backbone

    from .modeling import ARCHITECTURES, base_model_of, smile_classes

    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise MixcliError(f"{where}: smile_upscaling has no SMILE architecture for model type '{model_type}'; it "
                          f"upscales the Linears of {', '.join(sorted(ARCHITECTURES))} models")
    architecture = (config.get("architectures") or [None])[0]
    config_class, model_class, stock, auto = smile_classes(model_type, architecture)
    plain = meta_backbone(config, where, auto)
    return plain, base_model_of(plain), config_class, model_class


def linear_shapes(root, filters=()) -> dict:
    """``{path: (d_out, d_in)}`` of the Linears of ``root`` SMILE upscales."""
    from mixcli.backbone import find_linears, get_module

    return {path: tuple(get_module(root, path).weight.shape) for path in find_linears(root, tuple(filters))}


def build(context):
    from .construction import plan

    return plan(context)


METHOD = Upscaler(
    name="smile_upscaling",
    summary="SMILE: every Linear becomes the pretrained weight plus routed low-rank task-vector experts (no data)",
    build=build, params=Params, min_inputs=2, base="required", example={"k": 8},
)
