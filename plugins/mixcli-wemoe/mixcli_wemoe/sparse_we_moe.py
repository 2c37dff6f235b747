"""sparse_we_moe: E-WEMoE (arXiv 2410.21804; spec weight-ensembling.md §3).

    [method]
    name = "sparse_we_moe"
    base = "base"
    tv_prune_ratio = 0.9      # keep the ~10% largest-magnitude entries of every MLP task vector
    shared_gate = true        # one router for all layers

WE-MoE with magnitude-pruned task vectors (tensor by tensor, entries ``|τ| <= q`` with ``q`` the
interpolated ``tv_prune_ratio`` quantile are zeroed; any tensor size) and, by default, one
router shared by every layer, optionally reading a sinusoidal layer position encoding
prepended to the hidden state. ``post_sparse_gate`` prunes the routers after adaptation.
Task vectors are stored densely (zeros included).
"""

from __future__ import annotations

from dataclasses import dataclass

from mixcli import Upscaler, param

from .we_moe import ADAPT_SECTION, block_kinds
from .we_moe import Params as WEMoEParams


@dataclass
class Params(WEMoEParams):
    tv_prune_ratio: float = param(0.9, help="fraction of each MLP task-vector tensor pruned by magnitude",
                                  min=0, max=1)
    shared_gate: bool = param(True, help="one router shared by every layer's MoE block")
    position_encoding: bool = param(False, help="prepend a sinusoidal layer encoding to the router input")
    position_encoding_dim: int = param(8, help="size D of the layer encoding (even)", min=2)
    post_sparse_gate: bool = param(False, help="after adaptation, magnitude-prune the router parameters")
    gate_prune_ratio: float = param(0.0, help="fraction of router parameters pruned when post_sparse_gate",
                                    min=0, max=1)


def build(context):
    from mixcli import MixcliError

    from . import adapt
    from .construction import Spec, plan
    from .layers import prune_magnitude

    p = context.params
    if p["position_encoding"] and p["position_encoding_dim"] % 2:
        raise MixcliError(f"{context.project.where}: [method] position_encoding_dim must be even, "
                          f"got {p['position_encoding_dim']}")
    if p["post_sparse_gate"] and p["gate_prune_ratio"] == 0:
        from mixcli.errors import warn

        warn(f"{context.project.where}: [method] post_sparse_gate = true with gate_prune_ratio = 0 prunes "
             "nothing; set gate_prune_ratio (the fraction of router parameters zeroed after adaptation)")
    ratio = p["tv_prune_ratio"]
    spec = Spec("sparse_we_moe", kinds=block_kinds(p), delta=lambda t: prune_magnitude(t, ratio),
                config={"shared_gate": p["shared_gate"], "position_encoding": p["position_encoding"],
                        "position_encoding_dim": p["position_encoding_dim"]})
    out = plan(context, spec)
    adapt.attach(out, context)
    return out


METHOD = Upscaler(
    name="sparse_we_moe",
    summary="Sparse WE-MoE (E-WEMoE): magnitude-pruned MLP task vectors, one shared router",
    build=build, params=Params, min_inputs=2, sections=(ADAPT_SECTION,), base="required",
)
