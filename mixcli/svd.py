"""Singular-value helpers shared by the methods that decompose task vectors (TSV-M, Iso-C,
Iso-CTS, rank-one MoE, SMILE).

Everything runs in float32 (float64 when the input is float64), whatever the model dtype.
Singular components at or below :func:`tolerance` are *dropped*: the SVD of a zero or
rank-deficient matrix completes its basis with arbitrary, LAPACK-dependent vectors, and a
merge that kept them would inject directions that no input holds.
"""

from __future__ import annotations

import threading


def working(tensor):
    """``tensor`` in the dtype the decompositions run in (float32, or float64 if it is)."""
    import torch

    return tensor if tensor.dtype == torch.float64 else tensor.to(torch.float32)


def tolerance(sigma_max: float, shape, dtype) -> float:
    """Singular values at or below this are numerically zero: ``σ_max · max(m, n) · ε``."""
    import torch

    return float(sigma_max) * max(shape) * torch.finfo(dtype).eps


def svd(matrix):
    """The thin SVD ``U, σ, Vᵀ`` (``torch.linalg.svd``): every SVD of TSV-M, Iso-C and Iso-CTS
    runs here, so benchmarks/bench_singular.py can time them alone.

    Where LAPACK's single-precision divide and conquer does not converge, the SVD is taken
    in float64 and the factors rounded back: it happens on matrices whose singular values
    cluster, such as Iso-CTS's stacked bases (a 2048 x 2048 one of the 0.85 B benchmark, 400
    distinct values, failed in float32 on 2 threads and converged on 1 thread or in float64)."""
    import torch

    try:
        return torch.linalg.svd(matrix, full_matrices=False)
    except torch.linalg.LinAlgError:
        if matrix.dtype == torch.float64 or not bool(torch.isfinite(matrix).all()):
            raise
        u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
        return u.to(matrix.dtype), s.to(matrix.dtype), vh.to(matrix.dtype)


def thin_svd(matrix, reference: float | None = None):
    """``U, σ, Vᵀ`` of ``matrix`` with the components below :func:`tolerance` zeroed.

    ``reference`` is the σ_max the tolerance scales with when ``matrix`` was derived from a
    larger one (a residual after a projection), so that rounding noise is not kept."""
    u, s, vh = svd(matrix)
    return drop_negligible(matrix, u, s, vh, reference)


def drop_negligible(matrix, u, s, vh, reference: float | None = None):
    """The thin factors ``u, s, vh`` of ``matrix`` with the components below :func:`tolerance`
    zeroed (for factors of a full SVD, pass the first ``len(s)`` columns / rows)."""
    if s.numel():
        scale = float(s[0]) if reference is None else max(float(s[0]), reference)
        keep = s > tolerance(scale, matrix.shape, matrix.dtype)
        if not bool(keep.all()):
            u, s, vh = u * keep, s * keep, vh * keep.unsqueeze(1)
    return u, s, vh


def truncated_svd(matrix, k: int, reference: float | None = None, solver: str = "full"):
    """The top ``k`` components of :func:`thin_svd` (``k`` may exceed the rank); with
    ``solver = "randomized"``, of :func:`randomized_svd` instead."""
    if solver == "randomized":
        u, s, vh = drop_negligible(matrix, *randomized_svd(matrix, k), reference)
    else:
        u, s, vh = thin_svd(matrix, reference)
    return u[:, :k], s[:k], vh[:k]


POWER_ITERATIONS = 4  # subspace iterations of randomized_svd (see its tolerance there)


def randomized_svd(matrix, k: int):
    """The top ``k`` singular components of ``matrix``, approximately: a seeded Gaussian sketch
    of ``2k`` columns (oversampling ``k``), :data:`POWER_ITERATIONS` subspace iterations
    re-orthonormalised by QR, then the exact SVD of the ``2k``-row projection (Halko,
    Martinsson and Tropp 2011, algorithms 4.4 and 5.1). The QRs run on the shorter side.

    It pays only where the sketch is at most a quarter of the rank (``8k <= min(m, n)``; on 2
    cores, 2048 x 2048 and 5632 x 2048 in float32: k = r/8 took 0.39x and 0.61x the full SVD's
    time, k = r/4 1.15x and 1.94x; bench_singular.py --solver-times): elsewhere this is
    :func:`svd` itself, bit for bit. Where it runs, the error is that of the spectrum: on
    task vectors whose singular values fall at least as ``j⁻¹`` (fine-tunes' do, about
    ``j⁻¹·¹`` to ``j⁻¹·⁷`` in the zoo's), TSV-M's merged task vector stays within 1e-2
    (relative Frobenius) of the full-SVD merge; on a flat spectrum (noise) the top ``k``
    directions are not determined and it does not (tests/test_singular_merges.py)."""
    if 8 * k > min(matrix.shape):
        return svd(matrix)
    return range_finder_svd(matrix, k)


def range_finder_svd(matrix, k: int):
    """:func:`randomized_svd`'s range finder, wherever ``k`` lies (benchmarks time it)."""
    import torch

    m, n = matrix.shape
    wide = matrix.T if m > n else matrix  # m' <= n': QRs of m' x 2k
    generator = torch.Generator(device=matrix.device).manual_seed(0)
    sketch = torch.randn(wide.shape[1], 2 * k, generator=generator, dtype=matrix.dtype, device=matrix.device)
    basis = torch.linalg.qr(wide @ sketch).Q
    for _ in range(POWER_ITERATIONS):
        basis = torch.linalg.qr(wide @ torch.linalg.qr(wide.T @ basis).Q).Q
    u, s, vh = torch.linalg.svd(basis.T @ wide, full_matrices=False)
    u = basis @ u
    if m > n:
        u, vh = vh.T, u.T
    return u[:, :k], s[:k], vh[:k]


def polar(matrix):
    """The orthogonal polar factor ``P Qᵀ`` of ``matrix = P Σ Qᵀ`` (Procrustes)."""
    p, _, qh = svd(matrix)
    return p @ qh


def rank_per_task(rank_bound: int, tasks: int) -> int:
    """``int(r · (1/T))`` in double precision, as FusionBench computes TSV-M's per-task rank
    (not ``r // T``: it differs for some T, e.g. r = 49, T = 49 gives 0)."""
    return int(rank_bound * (1.0 / tasks))


def kept(u, s, vh):
    """Only the components :func:`thin_svd` did not drop (σ > 0)."""
    keep = s > 0
    return u[:, keep], s[keep], vh[keep]


class SVDCache:
    """Factors of one matrix shared by the several output tensors made from them (rank-one
    MoE's ``expert_u`` / ``expert_v``, SMILE's router and experts): computed once by whichever
    the engine asks for first, even when its threads ask at the same time, and dropped after
    the last of ``takers`` has taken them, so only the matrices in flight are held."""

    def __init__(self, takers: int = 2):
        self.takers = takers
        self.lock = threading.Lock()
        self.entries: dict = {}  # key -> [lock of this key, factors or None, takers left]

    def take(self, key, compute, takers: int | None = None):
        """The factors of ``key`` (``compute()`` the first time); ``takers`` overrides the
        count of takers for this key."""
        with self.lock:
            entry = self.entries.setdefault(key, [threading.Lock(), None, takers or self.takers])
        with entry[0]:
            if entry[1] is None:
                entry[1] = compute()
            factors = entry[1]
        with self.lock:
            entry[2] -= 1
            if entry[2] == 0:
                del self.entries[key]
        return factors
