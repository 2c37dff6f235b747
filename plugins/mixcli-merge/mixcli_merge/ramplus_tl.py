"""ramplus_tl (RAM+, tensor-local; arXiv 2601.13572): RAM with each model's unique changes
scaled up by how much of its change is shared, counted over the tensor."""

from __future__ import annotations

import dataclasses

from mixcli import MergeMethod, param

from .ram import combine


@dataclasses.dataclass
class Params:
    r: float = param(0.1, help="scale of the boost of unique changes (negative attenuates)")
    alpha: float = param(0.2, help="cap of the shared/unique ratio in the boost", min=0.0)
    epsilon: float = param(1e-5, help="changes |X - base| up to this count as no change "
                                      "(> 0: a model that changes nothing would make 0/0)",
                           min=0.0, min_exclusive=True)


def ramplus_tl(tensors, base, *, r=0.1, alpha=0.2, epsilon=1e-5, out=None):
    """RAM (see :func:`mixcli_merge.ram.ram`) with model ``i``'s uniquely changed entries scaled by
    ``λ_i = 1 + r · clamp(S_i / max(U_i, ε), 0, α)``, ``S_i`` / ``U_i`` the numbers of its
    active shared / unique entries in this tensor. ``λ`` is float32 as in mergekit 0.1.5, so the
    combination is float32; it is rounded once to the input dtype (mergekit returns float32)."""

    def scales(counts):
        shared, unique = counts()
        rho = shared / unique.clamp(min=epsilon)
        return (1 + r * rho.clamp(min=0, max=alpha)).unsqueeze(-1)

    return combine(tensors, base, epsilon, scales=scales, out=out)


METHOD = MergeMethod(
    name="ramplus_tl",
    summary="RAM+ (tensor-local): RAM with unique changes boosted by each model's shared share",
    merge=ramplus_tl,
    params=Params,
    base="required",
    min_inputs=1,
    accepts_out=True,
)
