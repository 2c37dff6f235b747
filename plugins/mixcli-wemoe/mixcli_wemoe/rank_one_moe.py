"""rank_one_moe: rank-one MoE (EnnengYang/RankOne-MoE; spec weight-ensembling.md §4).

    [method]
    name = "rank_one_moe"
    base = "base"
    rank_k = 32               # top singular components kept per task and weight matrix
    select_k = -1             # soft top-k over the n·rank_k coefficients (-1: all)
    router_hidden_layers = 1

Every MLP weight change ``ΔW_i = U S Vᵀ`` is cut to its top ``rank_k`` triplets; the pool of a
block holds ``n·rank_k`` rank-one experts ``σ u vᵀ`` and one router gives a coefficient to each
(the same coefficients drive all Linears of the block). Biases are not routed: ``b0 + λ Σ Δb_i``.
SVDs run in float32 on ``svd_device`` (cpu by default; cuda when available and asked).
"""

from __future__ import annotations

from dataclasses import dataclass

from mixcli import MixcliError, Upscaler, param

from mixcli.svd import SVDCache, truncated_svd, working

from .we_moe import ADAPT_SECTION, block_kinds
from .we_moe import Params as WEMoEParams


@dataclass
class Params(WEMoEParams):
    router_hidden_layers: int = param(1, help="router depth: 0, 1 (linear, default) or 2 (width 2K)", min=0, max=2)
    rank_k: int = param(32, help="singular components kept per task and weight matrix", min=1)
    select_k: int = param(-1, help="soft top-k over the whole coefficient vector (-1: use all)", min=-1)
    svd_device: str = param("cpu", help="torch device for the SVDs (cpu or cuda)")


def _experts(svd_device: str, cache: SVDCache | None = None):
    import torch

    cache = cache or SVDCache(takers=2)  # expert_u and expert_v

    def experts(path, attr, key, shape, read, names, base, p):
        k, lam = p["rank_k"], p["init_lambda"]
        if attr == "bias":
            def static():
                b0 = read(base, key)
                return b0 + lam * sum(read(m, key) - b0 for m in names)
            return {"bias": (shape, static)}

        def factors():
            w0 = read(base, key)
            us, vs = [], []
            for m in names:
                delta = (read(m, key) - w0).to(svd_device)
                if not bool(delta.abs().max() > 0):
                    raise MixcliError(f"rank_one_moe: model '{m}' does not change '{key}' (all-zero "
                                      "task vector): expert not trained")
                # numerically zero components come back as zeros, not arbitrary vectors
                u, s, vh = truncated_svd(working(delta), k)
                r = s.numel()
                pad = k - r  # fewer components than rank_k: zero experts keep the pool size
                us.append(torch.nn.functional.pad((u * s).T, (0, 0, 0, pad)).cpu())
                vs.append(torch.nn.functional.pad(vh, (0, 0, 0, pad)).cpu())
            return torch.cat(us), torch.cat(vs)

        count = len(names) * k
        return {"weight": (shape, lambda: read(base, key)),
                "expert_u": ((count, shape[0]), lambda: cache.take(key, factors)[0]),
                "expert_v": ((count, shape[1]), lambda: cache.take(key, factors)[1])}

    return experts


def build(context):
    from . import adapt
    from .construction import Spec, plan

    p = context.params
    if p["svd_device"].startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            p["svd_device"] = "cpu"  # optional accelerator: fall back silently
    spec = Spec("rank_one_moe", kinds=block_kinds(p), expert_kind="rank_one", experts=_experts(p["svd_device"]),
                config={"rank_k": p["rank_k"], "select_k": p["select_k"]})
    out = plan(context, spec)
    adapt.attach(out, context)
    return out


METHOD = Upscaler(
    name="rank_one_moe",
    summary="Rank-one MoE: experts are the top singular components of each task's MLP change",
    build=build, params=Params, min_inputs=2, sections=(ADAPT_SECTION,), base="required",
)
