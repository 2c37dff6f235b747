"""Compare mixcli-merge's tensor functions with mergekit 0.1.5's in-memory API, bit for bit.

Run with a Python that has both mixcli-merge and mergekit==0.1.5 (same torch version), e.g.

    python3 -m venv /tmp/mkvenv && /tmp/mkvenv/bin/pip install torch==2.13.0 mergekit==0.1.5
    /tmp/mkvenv/bin/pip install --no-deps -e . -e plugins/mixcli-merge && /tmp/mkvenv/bin/pip install pluggy
    /tmp/mkvenv/bin/python benchmarks/parity_mergekit.py

Prints, per method and dtype, the max |difference| and the number of differing elements.
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

from mixcli_merge import breadcrumbs, linear, model_stock, slerp, task_arithmetic, ties

SHAPES = [(2048, 1536), (1536,), (300, 7)]


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


def main():
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        for si, shape in enumerate(SHAPES):
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
            for case in cases:
                name, ours_fn, theirs_fn = case[:3]
                allowed = None
                if len(case) > 3:
                    if case[3] == "bc":  # both cut points, counted from the top
                        allowed = (tied_positions(base, xs, _bc_high)
                                   | tied_positions(base, xs, lambda n: _bc_high(n) - int(0.5 * n)))
                    else:
                        allowed = tied_positions(base, xs, case[3])
                ours, theirs = ours_fn(), theirs_fn()
                assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, name
                rows.append((name, str(dtype).replace("torch.", ""), "x".join(map(str, shape)),
                             *compare(ours, theirs, allowed)))
    print(f"{'method':20s} {'dtype':9s} {'shape':10s} {'max|diff|':>11s} {'#diff':>7s} {'#diff untied':>13s}")
    for name, dt, shape, mad, nd, outside in rows:
        print(f"{name:20s} {dt:9s} {shape:10s} {mad:11.3g} {nd:7d} {'-' if outside is None else outside:>13}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
