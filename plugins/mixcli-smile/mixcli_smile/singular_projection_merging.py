"""singular_projection_merging (SMILE paper, arXiv 2408.10174, "where task knowledge
lives"): a fine-tune's change to each Linear weight projected onto the pretrained weight's
top (``rank = "low"``) or remaining (``"high"``) singular subspaces,
``W = W0 + U_s U_sᵀ ΔW V_s V_sᵀ``. Every other tensor, biases included, is the fine-tune's."""

from __future__ import annotations

import dataclasses

from mixcli import MergeMethod, param
from mixcli.architecture import layout_of
from mixcli.svd import working


@dataclasses.dataclass
class Params:
    k: int = param(128, help="singular components of the pretrained weight in the low zone (< 0: the "
                             "fewest that hold half the singular-value sum)")
    rank: str = param("low", help="project onto the top k components (low) or the rest (high)",
                      choices=("low", "high"))
    full_matrices: bool = param(False, help="full SVD of the pretrained weight (with rank = high: the "
                                            "null spaces too)")


def is_linear_weight(tensor, name: str | None) -> bool:
    """A 2-D tensor that is not an embedding: what the method projects."""
    return tensor.dim() == 2 and tensor.is_floating_point() and (
        name is None or layout_of(None).role(name) != "pre")


def half_energy_rank(sigma) -> int:
    """The smallest k whose leading singular values sum to half the total."""
    import torch

    cumulative = torch.cumsum(sigma, 0)
    return int((cumulative < 0.5 * cumulative[-1]).sum()) + 1


def singular_projection_merging(tensors, base, *, k=128, rank="low", full_matrices=False, name=None):
    import torch

    (finetuned,) = tensors
    if not is_linear_weight(base, name):
        return finetuned
    w0 = working(base)
    delta = working(finetuned) - w0
    u, sigma, vh = torch.linalg.svd(w0, full_matrices=full_matrices)
    cut = half_energy_rank(sigma) if k < 0 else k
    if rank == "low":
        u_s, v_s = u[:, :cut], vh[:cut].T
    else:
        u_s, v_s = u[:, cut:], vh[cut:].T
    return w0 + u_s @ ((u_s.T @ delta @ v_s) @ v_s.T)


METHOD = MergeMethod(
    name="singular_projection_merging",
    summary="A fine-tune's Linear changes projected onto the pretrained weights' singular subspaces",
    merge=singular_projection_merging,
    params=Params,
    base="required",
    min_inputs=1,
    max_inputs=1,
    partial_tensors="singleton",
    wants_name=True,
    linear_algebra=True,
    working_memory=lambda shape, inputs: _working_memory(shape),
)


def _working_memory(shape) -> int:
    """float32 bytes: the pretrained weight, the delta, the result and the thin SVD's factors."""
    if len(shape) != 2:
        return 16 * max(1, shape[0] if shape else 1)
    m, n = shape
    r = min(m, n)
    return 4 * (3 * m * n + r * (m + n))
