"""Sparsifiers for task vectors (mergekit 0.1.5 semantics, spec §3.4.3-§3.4.4).

Eager sparsifiers (``magnitude``, ``magnitude_outliers``, ``della``) take a
freshly computed task vector ``delta`` that they may overwrite and return the sparsified
tensor. Magnitude selections can also be lazy (``magnitude_selection``,
``outlier_selection``): a :class:`Selection` applied chunk by chunk while merging, so task
vectors are never stored whole. Everything returns the input unchanged when
``density >= 1``.

Magnitude selection avoids a full sort: for 16-bit floats the exact threshold comes from a
histogram of the 15-bit magnitude bit patterns (non-negative floats order like their bit
patterns), for other dtypes from ``kthvalue``. Entries above the threshold are kept, then
entries equal to it in ascending flat index until exactly ``k`` are kept (spec §3.4.3).
Tensors are processed in cache-sized chunks so that temporaries stay in cache.
"""

from __future__ import annotations

from mixcli import MixcliError

from ._torch import torch

CHUNK = 1 << 18  # elements per chunk: a few MB of temporaries, fits in L2/L3
RESCALE_EPS = 1e-7


def chunks(n: int):
    """Yield ``(start, stop)`` bounds covering ``range(n)`` in CHUNK-sized pieces."""
    for start in range(0, n, CHUNK):
        yield start, min(start + CHUNK, n)


def _is16(dtype) -> bool:
    return dtype in (torch.bfloat16, torch.float16)


def _keys(chunk):
    """Sort keys of ``|chunk|``: the magnitude bit pattern (int16) for 16-bit floats, else ``|x|``."""
    if _is16(chunk.dtype):
        return chunk.view(torch.int16) & 0x7FFF  # clears the sign bit: |x| as a monotone int
    return chunk.abs()


def _below(value: float, dtype) -> float:
    """The largest value of ``dtype`` below the non-negative ``value`` (-1 below zero)."""
    if value <= 0:
        return -1.0
    return float(torch.nextafter(torch.tensor(value, dtype=dtype), torch.tensor(0.0, dtype=dtype)))


class _TopK:
    """The ``k`` largest ``|x|`` of a flat tensor, ties at the threshold ``tau`` broken by
    ascending flat index, as a plan per chunk: keep ``|x| >= tau`` in chunks before the last
    kept tie, ``|x| > tau`` after it, and a prefix of the ties in the chunk holding it.
    Bool masks are slow on CPU, so chunks are pruned with ``hardshrink`` (keeps ``|x| > l``).
    """

    def __init__(self, k: int, dtype, tau=None, greater: int = 0, tied_per_chunk=()):
        self.k = k
        self.dtype = dtype
        if k == 0:
            return
        if _is16(dtype):
            self.tau_key = tau
            tau = float(torch.tensor(tau, dtype=torch.int16).view(dtype))
        else:
            self.tau_key = tau = float(tau)
        self.strict, self.loose = tau, _below(tau, dtype)
        need = k - greater  # ties to keep, in flat order
        self.boundary, self.keep_in_boundary = len(tied_per_chunk), 0
        for c, count in enumerate(tied_per_chunk):
            if need < count:
                self.boundary, self.keep_in_boundary = c, need
                break
            need -= count

    def apply(self, c: int, part):
        """Prune chunk number ``c`` (in place) to its share of the top k."""
        if self.k == 0:
            return part.zero_()
        if c < self.boundary:
            return torch.hardshrink(part, self.loose, out=part)
        if c > self.boundary:
            return torch.hardshrink(part, self.strict, out=part)
        tied = (_keys(part) == self.tau_key).nonzero().squeeze(1)
        torch.hardshrink(part, self.loose, out=part)
        part[tied[self.keep_in_boundary:]] = 0
        return part


class Source:
    """A task vector given as a stored flat tensor, or lazily as ``x - base`` chunk by chunk."""

    def __init__(self, x, base=None):
        self.x = x.reshape(-1)
        self.base = None if base is None else base.reshape(-1)
        self.n = self.x.numel()
        self.dtype = self.x.dtype

    def chunk(self, a: int, b: int):
        if self.base is None:
            return self.x[a:b]
        return torch.sub(self.x[a:b], self.base[a:b])

    def full(self):
        return self.x if self.base is None else self.x - self.base


def top_cuts(source: Source, ks: list) -> list:
    """A :class:`_TopK` for each ``k`` in ``ks`` over ``|source|`` (exact, tie rule of §3.4.3)."""
    n, dtype = source.n, source.dtype
    ks = [min(max(k, 0), n) for k in ks]
    cuts = []
    if _is16(dtype):
        bounds = list(chunks(n))
        # one row per chunk, int32 (a chunk has at most CHUNK entries): half the memory of
        # bincount's int64, which for an embedding matrix is 64 MB per model
        per_chunk = torch.empty(len(bounds), 1 << 15, dtype=torch.int32)
        for row, (a, b) in zip(per_chunk, bounds):
            row.copy_(torch.bincount(_keys(source.chunk(a, b)), minlength=1 << 15))
        desc = per_chunk.sum(0, dtype=torch.int64).flip(0)  # desc[j]: entries with key 32767 - j
        at_least = desc.cumsum(0)
        for k in ks:
            if k == 0:
                cuts.append(_TopK(0, dtype))
                continue
            j = int(torch.searchsorted(at_least, k))  # first key from the top reaching k
            tau = (1 << 15) - 1 - j
            greater = int(at_least[j - 1]) if j > 0 else 0
            cuts.append(_TopK(k, dtype, tau, greater, per_chunk[:, tau].tolist()))
        return cuts
    mag = source.full().abs()
    for k in ks:
        if k == 0:
            cuts.append(_TopK(0, dtype))
            continue
        tau = torch.kthvalue(mag, n - k + 1).values
        tied = [int((mag[a:b] == tau).sum()) for a, b in chunks(n)]
        cuts.append(_TopK(k, dtype, tau, int((mag > tau).sum()), tied))
    return cuts


class Selection:
    """Keeps the entries of descending magnitude rank in ``[lo_k, hi_k)``; apply it to the
    chunks of the task vector (chunk number ``c`` of :func:`chunks`)."""

    def __init__(self, source: Source, hi_k: int, lo_k: int = 0):
        if lo_k > 0:
            self.hi, self.lo = top_cuts(source, [hi_k, lo_k])
        else:
            (self.hi,), self.lo = top_cuts(source, [hi_k]), None

    def apply(self, c: int, part):
        """Zero (in place) the entries of chunk ``c`` outside the selection."""
        if self.lo is None:
            return self.hi.apply(c, part)
        top = self.lo.apply(c, part.clone())
        return self.hi.apply(c, part).sub_(top)  # nested sets: removes top(lo_k) exactly


def magnitude_selection(source: Source, density: float):
    """Lazy TIES pruning: a :class:`Selection` of the ``max(1, floor(d*N))`` largest entries,
    ``None`` when nothing is pruned, ``0`` when everything is."""
    if density >= 1:
        return None
    if density <= 0 or source.n == 0:
        return 0
    return Selection(source, max(1, int(density * source.n)))


def outlier_selection(source: Source, density: float, gamma: float):
    """Lazy breadcrumbs pruning: keep ascending sorted positions ``[n_bot, n_bot + target)``
    with ``target = floor(d*N)``, ``n_top = floor(gamma*N)``, ``n_bot = max(0, N-target-n_top)``;
    ``None`` when nothing is pruned, ``0`` when everything is."""
    if density >= 1:
        return None
    n = source.n
    target = int(density * n)
    n_bot = max(0, n - target - int(gamma * n))
    if target <= 0 or n == 0:
        return 0
    # in descending order the kept block is ranks [n - n_bot - target, n - n_bot)
    return Selection(source, n - n_bot, n - n_bot - target)


def _l1(x):
    """L1 norm of the whole tensor, in the tensor's dtype (float32 for float16, which overflows)."""
    if x.dtype == torch.float16:
        return x.abs().sum(dtype=torch.float32)
    return x.abs().sum()


def _rescale(masked, before) -> None:
    """Scale ``masked`` in place so its L1 norm equals ``before`` (skipped for tiny norms)."""
    after = _l1(masked)
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return
    ratio = (before / after).to(masked.dtype)
    masked.mul_(ratio)


def _apply(delta, selection, rescale: bool):
    """Apply a lazy selection to a stored task vector (in place), with optional L1 rescale."""
    if selection is None:
        return delta
    if selection == 0:
        return torch.zeros_like(delta)
    before = _l1(delta) if rescale else None
    flat = delta.view(-1)
    for c, (a, b) in enumerate(chunks(flat.numel())):
        selection.apply(c, flat[a:b])
    if rescale:
        _rescale(delta, before)
    return delta


def magnitude(delta, density: float, rescale: bool = False):
    """TIES pruning: keep the ``k = max(1, floor(d*N))`` largest ``|delta|`` of the whole tensor."""
    return _apply(delta, magnitude_selection(Source(delta), density), rescale)


def magnitude_outliers(delta, density: float, gamma: float, rescale: bool = False):
    """Breadcrumbs: drop the smallest and the ``gamma`` largest entries, keep ``floor(d*N)``."""
    return _apply(delta, outlier_selection(Source(delta), density, gamma), rescale)


def _keep_probability(density: float, dtype) -> float:
    """The density as mergekit's Bernoulli sees it: rounded to bf16 for bf16 tensors, else float32."""
    work = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
    return float(torch.tensor(density, dtype=work))


class BernoulliSelection:
    """Lazy DARE pruning: keep each entry independently with probability ``density``
    (bf16-rounded for bf16), float32 uniforms drawn chunk by chunk from ``generator``.

    Without ``rescale`` the uniforms are drawn as :meth:`apply` is called for chunks
    ``0, 1, 2, ...`` in order. With ``rescale`` a first pass draws the masks, keeps them
    packed (one bit per entry) and measures the L1 norms before and after masking (summed
    per chunk in float32, rounded to the working dtype). The task vector is never stored.
    """

    def __init__(self, source: Source, density: float, generator, rescale: bool):
        self.p = _keep_probability(density, source.dtype)
        self.generator = generator
        self.ratio = None
        self.packed: list | None = None
        if rescale:
            import numpy as np

            self.packed = []
            before = after = 0.0
            for a, b in chunks(source.n):
                part = source.chunk(a, b)
                # drawn on the generator's device (the CPU), whatever the tensors' device:
                # the same masks as a CPU merge
                mask = torch.rand(b - a, generator=generator, device=generator.device) < self.p
                self.packed.append(np.packbits(mask.numpy()))
                before += float(part.abs().sum(dtype=torch.float32))
                after += float(part.mul_(mask.to(part.device)).abs().sum(dtype=torch.float32))
            work = torch.float32 if source.dtype == torch.float16 else source.dtype
            before_t, after_t = torch.tensor(before, dtype=work), torch.tensor(after, dtype=work)
            if before_t >= RESCALE_EPS and after_t >= RESCALE_EPS:
                self.ratio = (before_t / after_t).to(source.dtype)

    def apply(self, c: int, part):
        if self.packed is None:
            mask = torch.rand(part.numel(), generator=self.generator, device=self.generator.device) < self.p
        else:
            import numpy as np

            bits = np.unpackbits(self.packed[c], count=part.numel())
            mask = torch.from_numpy(bits.view(np.bool_))
        part.mul_(mask.to(part.device))
        if self.ratio is not None:
            part.mul_(self.ratio)
        return part


def bernoulli_selection(source: Source, density: float, generator, rescale: bool = False):
    """A :class:`BernoulliSelection`, or ``None`` when nothing is pruned."""
    if density >= 1:
        return None
    return BernoulliSelection(source, density, generator, rescale)


def della(delta, density: float, epsilon: float, generator, rescale: bool = False):
    """DELLA MagPrune: per row, keep entry of rank r in [0, 1] with probability ``d - eps + 2 eps r``.

    A 1-D tensor is one row; higher ranks are flattened into rows along the first dimension
    (mergekit ranks along dim 1 there; such tensors do not occur in supported LLMs). Ranks,
    ``r`` and the probability are computed in bf16 for bf16 tensors (else float32), as mergekit.
    Rows of length 1 have no ranking (mergekit divides 0 by 0 and fails): such a tensor's
    delta is left unpruned.
    """
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    if not (density - epsilon > 0 and density + epsilon < 1):
        raise MixcliError(
            f"della: density {density} and epsilon {epsilon} must satisfy 0 < density - epsilon "
            f"and density + epsilon < 1")
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
    width = rows.shape[1]
    if width < 2:
        return delta
    work = torch.bfloat16 if delta.dtype == torch.bfloat16 else torch.float32
    order = rows.abs().argsort(dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(width).expand_as(order))
    prob = ranks.to(work).div_(width - 1).clamp_(0, 1).mul_(2 * epsilon).add_(density - epsilon)
    del order, ranks
    before = _l1(delta) if rescale else None
    keep = torch.rand(rows.shape, generator=generator, device=generator.device).to(prob.device) < prob
    rows = rows.mul_(keep) if rows.data_ptr() == delta.data_ptr() else rows.mul(keep)
    delta = rows.view(delta.shape)
    if rescale:
        _rescale(delta, before)
    return delta
