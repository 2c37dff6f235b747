"""What TSV-M, Iso-C and Iso-CTS share: task vectors in float32, the rule that sends a
tensor to the method's SVD rule or to the plain mean, and the final ``W0 + c·Δ``."""

from __future__ import annotations

from mixcli import param
from mixcli.safetensors_io import release_pages
from mixcli.svd import polar, working

from ._torch import torch

EXCLUDE_HELP = ("exact tensor names merged by the mean of the task vectors instead of the SVD rule "
                "(causal LMs: the embeddings and lm_head)")
DECOMPOSE_HELP = "use the SVD rule on this 2-D tensor (false: the mean of the task vectors); filterable"


def exclude_keys_param():
    return param([], help=EXCLUDE_HELP)


def decompose_param():
    return param(True, help=DECOMPOSE_HELP)


def svd_solver_param():
    return param("full", help="mixcli only: \"randomized\" finds each task's top components by a randomized "
                              "range finder where T >= 8, the full SVD below (mixcli.svd.randomized_svd: within "
                              "1e-2 of \"full\" on decaying spectra, not on noise)",
                 choices=("full", "randomized"))


def task_vectors(tensors, base, weights=None) -> list:
    """``weight_i · (X_i − W0)`` in float32 (float64 for float64 inputs). The task models'
    mapped pages go once these hold the values (:func:`release_pages`; the base's stay for
    :func:`finish`)."""
    w0 = working(base)
    taus = [working(x) - w0 for x in tensors]
    for x in tensors:
        release_pages(x)
    if weights is not None:
        taus = [tau if w == 1.0 else tau * w for tau, w in zip(taus, weights)]
    return taus


def is_matrix(tensor, name: str | None, exclude_keys, decompose: bool) -> bool:
    """Floating, two-dimensional, not excluded by name and not switched off."""
    return (decompose and tensor.is_floating_point() and tensor.dim() == 2 and min(tensor.shape) > 0
            and (name is None or name not in exclude_keys))


def mean(taus):
    total = torch.zeros_like(taus[0])
    for tau in taus:
        total += tau
    return total / len(taus)


def mean_merged(tensors, base, coefficient: float, weights=None, out=None):
    """``finish(base, mean(task_vectors(tensors, base, weights)), coefficient)`` a chunk of
    elements at a time: the same arithmetic for every element, without whole float32 task
    vectors (an embedding's are hundreds of MB each, and several are held at once), and with
    each chunk's mapped input pages let go once used. Into ``out`` when given (each element
    rounded once to its dtype, as the engine would)."""
    from .sparsify import chunks

    if out is None:
        out = torch.empty(base.shape, dtype=working(base[:0]).dtype)
    flat, w0, xs = out.view(-1), base.reshape(-1), [x.reshape(-1) for x in tensors]
    for a, b in chunks(flat.numel()):
        flat[a:b] = finish(w0[a:b], mean(task_vectors([x[a:b] for x in xs], w0[a:b], weights)), coefficient)
        release_pages(w0[a:b])
    return out


def written(result, out):
    """``result`` (working dtype), or ``out`` filled with it, rounded once."""
    return result if out is None else out.copy_(result)


def orthogonalised(blocks: list, shape, dtype, flat: bool):
    """The retained ``(U, σ, Vᵀ)`` blocks stacked, their bases made orthogonal (polar factors)
    and multiplied back: ``polar(Û) diag(ŝ) polar(V̂ᵀ)``, or ``mean(ŝ) polar(Û) polar(V̂ᵀ)``
    with ``flat``. No blocks left (zero task vectors): zeros of ``shape``. ``blocks`` is
    emptied once stacked, so the factors are not held twice while the polar SVDs run."""
    values = torch.cat([s for _, s, _ in blocks])
    if values.numel() == 0:
        return torch.zeros(shape, dtype=dtype)
    stacks = [torch.cat([u for u, _, _ in blocks], dim=1), torch.cat([vh for _, _, vh in blocks], dim=0)]
    blocks.clear()
    u = polar(stacks.pop(0))
    vh = polar(stacks.pop())
    return values.mean() * (u @ vh) if flat else (u * values) @ vh


def finish(base, delta, coefficient: float):
    """``W0 + coefficient · Δ`` in the working dtype (rounded once, by the engine)."""
    return working(base) + (delta if coefficient == 1.0 else delta * coefficient)


def working_memory(shape, inputs: int, factor_sets: int) -> int:
    """Bytes of float32 a decomposition of one ``shape`` matrix holds: task vector and output
    (2mn), plus ``factor_sets`` sets of factors (mr + rn each)."""
    if len(shape) != 2:
        return 16 * max(1, _numel(shape))
    m, n = shape
    r = min(m, n)
    return 4 * (2 * m * n + factor_sets * (m * r + r * n) + m * n)


def _numel(shape) -> int:
    count = 1
    for size in shape:
        count *= size
    return count
