"""Compare mixcli-merge's tensor functions with mergekit 0.1.5's in-memory API, bit for bit.

Run with a Python that has both mixcli-merge and mergekit==0.1.5 (same torch version), e.g.

    python3 -m venv /tmp/mkvenv && /tmp/mkvenv/bin/pip install torch==2.13.0 mergekit==0.1.5
    /tmp/mkvenv/bin/pip install --no-deps -e . -e plugins/mixcli-merge && /tmp/mkvenv/bin/pip install pluggy
    /tmp/mkvenv/bin/python benchmarks/parity_mergekit.py

Prints, per method and dtype, the max |difference| and the number of differing elements
(``parity_mergekit.py sce ram`` compares only the methods named; ``--small`` uses smaller
tensors, for the test suite). arcee_fusion and
ramplus_tl return float32 in mergekit and the input dtype in mixcli: mergekit's result is
rounded before comparing. arcee_fusion's quartiles of tensors over 1e6 entries come from a
random sample (mergekit's from the global generator), so that row may differ; the
"<=1e6" row is the deterministic comparison.
For ties/breadcrumbs, elements can only differ where magnitudes tie at the selection
threshold (mergekit's unstable argsort picks arbitrary tied entries; mixcli takes the lowest
indices), so those rows also report differences outside tied positions (must be 0).
Not part of the test suite; always exits 0.
"""

from __future__ import annotations

import sys

import torch

try:
    from mergekit.merge_methods.api import merge_tensors
except ImportError:
    print("mergekit is not installed in this Python; nothing compared "
          "(pip install torch==2.13.0 mergekit==0.1.5 in a separate venv)")
    sys.exit(0)

from mixcli_merge import (arcee_fusion, breadcrumbs, karcher, linear, model_stock, multislerp,
                          nearswap, nuslerp, ram, ramplus_tl, sce, slerp, task_arithmetic, ties)

SHAPES = [(2048, 1536), (1536,), (300, 7)]
SMALL_SHAPES = [(384, 256), (1536,), (300, 7)]  # --small: quick, for the test suite


def inputs(shape, dtype, n, seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g) * 0.02
    xs = [base + torch.randn(shape, generator=g) * 0.003 for _ in range(n)]
    return base.to(dtype), [x.to(dtype) for x in xs]


def tied_positions(base, xs, cut):
    """Elements whose |delta| equals the k-th largest of its model, ``k = cut(N)`` (only
    they may differ)."""
    mask = torch.zeros(base.shape, dtype=torch.bool)
    for x in xs:
        mag = (x - base).abs().float().reshape(-1)
        k = cut(mag.numel())
        if not 0 < k <= mag.numel():
            continue
        tau = mag.kthvalue(mag.numel() - k + 1).values
        mask |= (mag == tau).view(base.shape)
    return mask


def _bc_high(n, density=0.5, gamma=0.05):
    """Breadcrumbs keeps descending ranks [high - target, high) with high = N - n_bot."""
    return n - max(0, n - int(density * n) - int(gamma * n))


def compare(ours, theirs, allowed=None):
    diff = ours.double() - theirs.double()
    bad = (ours.view(-1) != theirs.view(-1)).view(ours.shape) & ~(ours.isnan() & theirs.isnan())
    outside = int((bad & ~allowed).sum()) if allowed is not None else None
    return float(diff.abs().max()), int(bad.sum()), outside


def sparse_inputs(shape, dtype, n, seed, keep=0.4):
    """Deltas that are zero at random positions, so some entries are changed by one model
    only (RAM's unique entries)."""
    base, xs = inputs(shape, dtype, n, seed)
    g = torch.Generator().manual_seed(seed + 1)
    return base, [torch.where(torch.rand(shape, generator=g) < keep, x, base) for x in xs]


def more_cases(base, xs, sparse_base, sparse):
    """The eight methods added after the first twelve: (name, ours, mergekit's)."""
    w = [0.5, 0.3, 0.7]
    small = [x.reshape(-1)[:1_000_000] for x in xs[:1]]  # arcee_fusion samples above 1e6 entries
    return [
        ("nuslerp", lambda: nuslerp.nuslerp(xs[:2], None, weight=w[:2]),
         lambda: merge_tensors(xs[:2], "nuslerp", parameters={"weight": w[:2]})),
        ("nuslerp base", lambda: nuslerp.nuslerp(xs[:2], base, weight=w[:2]),
         lambda: merge_tensors([base] + xs[:2], "nuslerp", parameters={"weight": w[:2]}, base_index=0)),
        ("nuslerp rows", lambda: nuslerp.nuslerp(xs[:2], base, weight=w[:2], nuslerp_flatten=False),
         lambda: merge_tensors([base] + xs[:2], "nuslerp", parameters={
             "weight": w[:2], "nuslerp_flatten": False}, base_index=0)),
        ("nuslerp columns", lambda: nuslerp.nuslerp(xs[:2], None, weight=w[:2], nuslerp_flatten=False,
                                                   nuslerp_row_wise=True),
         lambda: merge_tensors(xs[:2], "nuslerp", parameters={
             "weight": w[:2], "nuslerp_flatten": False, "nuslerp_row_wise": True})),
        ("multislerp", lambda: multislerp.multislerp(xs, None, weight=w),
         lambda: merge_tensors(xs, "multislerp", parameters={"weight": w})),
        ("multislerp base", lambda: multislerp.multislerp(xs, base, weight=w, normalize_weights=False),
         lambda: merge_tensors([base] + xs, "multislerp", parameters={
             "weight": w, "normalize_weights": False}, base_index=0)),
        ("karcher", lambda: karcher.karcher(xs + [base], None),
         lambda: merge_tensors(xs + [base], "karcher")),
        ("karcher iter=2", lambda: karcher.karcher(xs, None, max_iter=2, tol=1e-7),
         lambda: merge_tensors(xs, "karcher", parameters={"max_iter": 2, "tol": 1e-7})),
        ("sce", lambda: sce.sce(xs, base),
         lambda: merge_tensors([base] + xs, "sce", base_index=0)),
        ("sce topk=0.5", lambda: sce.sce(xs, base, select_topk=0.5),
         lambda: merge_tensors([base] + xs, "sce", parameters={"select_topk": 0.5}, base_index=0)),
        ("nearswap t=1e-3", lambda: nearswap.nearswap(xs[:1], base, t=1e-3),
         lambda: merge_tensors([base, xs[0]], "nearswap", parameters={"t": 1e-3}, base_index=0)),
        ("arcee_fusion", lambda: arcee_fusion.arcee_fusion(xs[:1], base),
         lambda: merge_tensors([base, xs[0]], "arcee_fusion", base_index=0).to(base.dtype),
         "sampled" if base.numel() > 1_000_000 else None),
        ("arcee_fusion <=1e6", lambda: arcee_fusion.arcee_fusion(small, base.reshape(-1)[:1_000_000]),
         lambda: merge_tensors([base.reshape(-1)[:1_000_000], small[0]], "arcee_fusion",
                               base_index=0).to(base.dtype)),
        ("ram", lambda: ram.ram(sparse, sparse_base),
         lambda: merge_tensors([sparse_base] + sparse, "ram", base_index=0)),
        ("ramplus_tl", lambda: ramplus_tl.ramplus_tl(sparse, sparse_base),
         lambda: merge_tensors([sparse_base] + sparse, "ramplus_tl", base_index=0).to(base.dtype)),
        ("ramplus_tl r=1 a=5", lambda: ramplus_tl.ramplus_tl(sparse, sparse_base, r=1.0, alpha=5.0),
         lambda: merge_tensors([sparse_base] + sparse, "ramplus_tl", parameters={"r": 1.0, "alpha": 5.0},
                               base_index=0).to(base.dtype)),
    ]


def main(only=(), small=False):
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        for si, shape in enumerate(SMALL_SHAPES if small else SHAPES):
            base, xs = inputs(shape, dtype, 3, 100 + si)
            w = [0.5, 0.3, 0.7]
            cases = [
                ("linear", lambda: linear.linear(xs, None, weight=w),
                 lambda: merge_tensors(xs, "linear", parameters={"weight": w})),
                ("linear nonorm", lambda: linear.linear(xs, None, weight=w, normalize=False),
                 lambda: merge_tensors(xs, "linear", parameters={"weight": w, "normalize": False})),
                ("slerp t=0.3", lambda: slerp.slerp(xs[:1], base, t=0.3),
                 lambda: merge_tensors([base, xs[0]], "slerp", parameters={"t": 0.3}, base_index=0)),
                ("task_arithmetic", lambda: task_arithmetic.task_arithmetic(xs, base, weight=w, lambda_=0.9),
                 lambda: merge_tensors(xs + [base], "task_arithmetic",
                                       parameters={"weight": w, "lambda": 0.9}, base_index=3)),
                ("ta normalize", lambda: task_arithmetic.task_arithmetic(xs, base, weight=w, normalize=True),
                 lambda: merge_tensors(xs + [base], "task_arithmetic",
                                       parameters={"weight": w, "normalize": True}, base_index=3)),
                ("ties d=0.3", lambda: ties.ties(xs, base, weight=w, density=0.3),
                 lambda: merge_tensors(xs + [base], "ties",
                                       parameters={"weight": w, "density": 0.3}, base_index=3),
                 lambda n: max(1, int(0.3 * n))),
                ("ties d=.2 rescale", lambda: ties.ties(xs, base, weight=w, density=0.2, rescale=True),
                 lambda: merge_tensors(xs + [base], "ties", parameters={
                     "weight": w, "density": 0.2, "rescale": True}, base_index=3),
                 lambda n: max(1, int(0.2 * n))),
                ("breadcrumbs", lambda: breadcrumbs.breadcrumbs(xs, base, weight=w, density=0.5, gamma=0.05),
                 lambda: merge_tensors(xs + [base], "breadcrumbs", parameters={
                     "weight": w, "density": 0.5, "gamma": 0.05}, base_index=3),
                 "bc"),
                ("model_stock", lambda: model_stock.model_stock(xs, base),
                 lambda: merge_tensors([base] + xs, "model_stock", base_index=0)),
                ("model_stock fw", lambda: model_stock.model_stock(xs, base, filter_wise=True),
                 lambda: merge_tensors([base] + xs, "model_stock",
                                       parameters={"filter_wise": True}, base_index=0)),
            ]
            cases += more_cases(base, xs, *sparse_inputs(shape, dtype, 3, 200 + si))
            if only:
                cases = [case for case in cases if case[0].split()[0] in only]
            for case in cases:
                name, ours_fn, theirs_fn = case[:3]
                allowed, note = None, ""
                if len(case) > 3 and case[3] == "sampled":
                    note = "random quartile sample (mergekit: global generator)"
                elif len(case) > 3 and case[3] is not None:
                    if case[3] == "bc":  # both cut points, counted from the top
                        allowed = (tied_positions(base, xs, _bc_high)
                                   | tied_positions(base, xs, lambda n: _bc_high(n) - int(0.5 * n)))
                    else:
                        allowed = tied_positions(base, xs, case[3])
                ours, theirs = ours_fn(), theirs_fn()
                assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, name
                rows.append((name, str(dtype).replace("torch.", ""), "x".join(map(str, shape)),
                             *compare(ours, theirs, allowed), note))
    print(f"{'method':20s} {'dtype':9s} {'shape':10s} {'max|diff|':>11s} {'#diff':>7s} {'#diff untied':>13s}")
    for name, dt, shape, mad, nd, outside, note in rows:
        print(f"{name:20s} {dt:9s} {shape:10s} {mad:11.3g} {nd:7d} {'-' if outside is None else outside:>13}"
              f"  {note}".rstrip())
    return 0


if __name__ == "__main__":
    args = sys.argv[1:]
    sys.exit(main({a for a in args if a != "--small"}, "--small" in args))
