"""Tensor-level invariants of the merge methods (spec merge-methods.md §6, items 6-27)."""

import math

import numpy as np
import pytest
import torch

import mixcli
from mixcli import MixcliError
from mixcli.params import check_setting, evaluate
from mixcli_merge import (breadcrumbs, breadcrumbs_ties, dare_linear, dare_ties, della,
                          della_linear, linear, model_stock, passthrough, slerp, sparsify,
                          task_arithmetic, ties)
import mixcli_merge

TA_FAMILY = {
    "task_arithmetic": task_arithmetic.task_arithmetic, "ties": ties.ties,
    "dare_ties": dare_ties.dare_ties, "dare_linear": dare_linear.dare_linear,
    "breadcrumbs": breadcrumbs.breadcrumbs, "breadcrumbs_ties": breadcrumbs_ties.breadcrumbs_ties,
    "della": della.della, "della_linear": della_linear.della_linear,
}
RANDOM = {"dare_ties", "dare_linear", "della", "della_linear"}


def rand(*shape, seed=0, dtype=torch.float32, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def ta_call(name, tensors, base, **kw):
    if name in RANDOM:
        kw.setdefault("seed", 1)
    return TA_FAMILY[name](tensors, base, **kw)


def ulp_close(a, b, ulps=1):
    """|a - b| <= ulps units in the last place of a's dtype."""
    spacing = torch.finfo(a.dtype).eps * torch.maximum(a.abs(), b.abs()).float()
    tiny = torch.finfo(a.dtype).tiny
    return bool(((a.float() - b.float()).abs() <= ulps * spacing + tiny).all())


# ---------------------------------------------------------------- registration

def test_registers_all_methods_with_contracts():
    seen = []
    mixcli_merge.register_merge_methods(seen.append)
    by_name = {m.name: m for m in seen}
    assert set(by_name) == {"linear", "slerp", "task_arithmetic", "ties", "dare_ties",
                            "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della",
                            "della_linear", "model_stock", "passthrough", "nuslerp", "multislerp",
                            "karcher", "sce", "nearswap", "arcee_fusion", "ram", "ramplus_tl",
                            "tsv_merge", "iso_c", "iso_cts"}
    assert by_name["linear"].base == "ignored" and by_name["passthrough"].base == "ignored"
    assert by_name["passthrough"].max_inputs == 1
    assert (by_name["slerp"].min_inputs, by_name["slerp"].max_inputs) == (1, 1)
    assert by_name["slerp"].partial_tensors == "singleton"
    assert by_name["model_stock"].min_inputs == 2
    assert by_name["model_stock"].partial_tensors == "base_or_skip"
    for name in TA_FAMILY:
        assert by_name[name].base == "required" and by_name[name].partial_tensors == "merge"
        assert by_name[name].random == (name in RANDOM)
    for m in seen:
        assert m.summary and m.param_specs is not None


# item 25: the default-normalise table of §3.4.1
@pytest.mark.parametrize("name,normalize,rescale", [
    ("task_arithmetic", False, False), ("ties", True, False), ("dare_ties", False, True),
    ("dare_linear", False, True), ("breadcrumbs", False, False),
    ("breadcrumbs_ties", False, False), ("della", True, True), ("della_linear", False, True),
])
def test_family_defaults(name, normalize, rescale):
    method = getattr(mixcli_merge, name).METHOD
    specs = method.param_specs
    assert specs["normalize"].default is normalize
    assert specs["rescale"].default is rescale
    assert specs["lambda"].default == 1.0 and specs["lambda"].field == "lambda_"
    assert specs["weight"].required and specs["weight"].per_model
    assert specs["density"].default == 1.0 and specs["density"].per_model
    assert specs["int8_mask"].default is False
    if "breadcrumbs" in name:
        assert specs["gamma"].default == 0.01 and specs["gamma"].per_model
    if "della" in name:
        assert specs["epsilon"].default == 0.15 and specs["epsilon"].per_model


def test_other_defaults():
    assert linear.METHOD.param_specs["weight"].required
    assert linear.METHOD.param_specs["normalize"].default is True
    assert slerp.METHOD.param_specs["t"].required
    assert model_stock.METHOD.param_specs["filter_wise"].default is False
    assert passthrough.METHOD.param_specs["scale"].default is None


# ---------------------------------------------------------------- linear (6-9)

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_linear_single_input_is_identity(dtype):  # item 6
    x = rand(64, 33, dtype=dtype)
    out = linear.linear([x], None, weight=[3.7])
    assert out.dtype == dtype
    if dtype == torch.bfloat16:
        assert torch.equal(out, x)
    else:
        assert ulp_close(out, x)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_linear_identical_inputs(dtype):  # item 7
    x = rand(100, 7, dtype=dtype, seed=3)
    out = linear.linear([x, x, x], None, weight=[0.2, 1.3, 0.77])
    if dtype == torch.bfloat16:
        assert torch.equal(out, x)
    else:
        # three rounded products, two additions and a division (mergekit's order): the
        # error can exceed the spec's 1 ulp slightly; two weights stay within it
        assert ulp_close(out, x, ulps=2)
        assert ulp_close(linear.linear([x, x], None, weight=[0.3, 0.7]), x)


def test_linear_unnormalized_is_fp32_weighted_sum():  # item 8
    xs = [rand(300, 5, seed=i, dtype=torch.bfloat16) for i in range(3)]
    w = [0.5, -2.0, 0.25]  # products exact in fp32, so the sum order is the only rounding
    ref = torch.zeros(300, 5)
    for x, wi in zip(xs, w):
        ref += x.float() * wi
    assert torch.equal(linear.linear(xs, None, weight=w, normalize=False), ref.to(torch.bfloat16))
    w = [0.3, -1.7, 2.25]
    exact = sum(x.double() * float(np.float32(wi)) for x, wi in zip(xs, w))
    out = linear.linear(xs, None, weight=w, normalize=False).double()
    assert bool(((out - exact).abs() <= exact.abs() * 2 ** -8 + 1e-30).all())  # bf16 rounding


def test_linear_zero_weight_sum_errors():  # item 9
    x = rand(4)
    with pytest.raises(MixcliError, match="sum to zero"):
        linear.linear([x, x], None, weight=[1.0, -1.0])
    assert torch.equal(linear.linear([x, x], None, weight=[1.0, -1.0], normalize=False),
                       torch.zeros(4))


def test_linear_weight_one_zero_returns_first():
    a, b = rand(50, 3, seed=1, dtype=torch.bfloat16), rand(50, 3, seed=2, dtype=torch.bfloat16)
    assert torch.equal(linear.linear([a, b], None, weight=[1.0, 0.0]), a)


def test_linear_float64_stays_float64():
    a, b = rand(10, seed=1, dtype=torch.float64), rand(10, seed=2, dtype=torch.float64)
    out = linear.linear([a, b], None, weight=[1.0, 3.0])
    assert out.dtype == torch.float64
    assert torch.allclose(out, (a + 3 * b) / 4, rtol=1e-14, atol=0)


# ---------------------------------------------------------------- slerp (10-14)

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("collinear", [False, True])
def test_slerp_endpoints(dtype, collinear):  # item 10, both branches
    a = rand(40, 9, seed=1, dtype=dtype)
    b = (a.float() * 2).to(dtype) if collinear else rand(40, 9, seed=2, dtype=dtype)
    assert torch.equal(slerp.slerp([b], a, t=0.0), a)
    assert torch.equal(slerp.slerp([b], a, t=1.0), b)


def test_slerp_same_tensor():  # item 11
    a = rand(1000, seed=4)
    assert ulp_close(slerp.slerp([a], a, t=0.37), a)


def test_slerp_antipodal_is_lerp():  # item 12
    a = rand(257, seed=5)
    t = 0.3
    out = slerp.slerp([-a], a, t=t)
    assert torch.allclose(out, (1 - 2 * t) * a, rtol=1e-6, atol=1e-7)


def test_slerp_zero_base():  # item 13
    b = rand(64, seed=6)
    out = slerp.slerp([b], torch.zeros(64), t=0.5)
    assert torch.allclose(out, math.sin(math.pi / 4) * b, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(out, 0.5 * b)


def test_slerp_matches_formula_and_dtype():
    a, b = rand(3000, seed=7), rand(3000, seed=8)
    t = 0.25
    na, nb = a.double().norm(), b.double().norm()
    theta = torch.acos((a.double() / na) @ (b.double() / nb))
    ref = (torch.sin((1 - t) * theta) * a.double() + torch.sin(t * theta) * b.double()) / torch.sin(theta)
    assert torch.allclose(slerp.slerp([b], a, t=t).double(), ref, rtol=1e-5, atol=1e-6)
    assert slerp.slerp([b.bfloat16()], a.bfloat16(), t=t).dtype == torch.bfloat16


def test_slerp_t_from_filtered_gradients():  # item 14
    spec = slerp.METHOD.param_specs["t"]
    setting = check_setting(spec, [
        {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
        {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
        {"value": 0.5}], "test")
    attn = evaluate(setting, "model.layers.7.self_attn.q_proj.weight", 7 / 31)
    mlp = evaluate(setting, "model.layers.7.mlp.up_proj.weight", 7 / 31)
    norm = evaluate(setting, "model.norm.weight", 0.0)
    assert attn == 0.45161290322580644 and mlp == 1 - 0.45161290322580644 and norm == 0.5
    a, b = rand(100, seed=1), rand(100, seed=2)
    assert torch.equal(slerp.slerp([b], a, t=attn), slerp.slerp([b], a, t=0.45161290322580644))


def test_slerp_contract():
    a = rand(4)
    with pytest.raises(MixcliError):
        slerp.slerp([a, a], a, t=0.5)


# ---------------------------------------------------------------- task arithmetic family (15-24)

@pytest.mark.parametrize("name", sorted(TA_FAMILY))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_lambda_zero_or_zero_weights_give_base(name, dtype):  # item 15
    base = rand(64, 16, seed=1, dtype=dtype)
    xs = [rand(64, 16, seed=s, dtype=dtype) for s in (2, 3)]
    kw = {"density": 0.5} if name != "task_arithmetic" else {}
    out = ta_call(name, xs, base, weight=[0.7, 0.4], lambda_=0.0, **kw)
    assert torch.equal(out, base) and out.dtype == dtype
    out = ta_call(name, xs, base, weight=[0.0, 0.0], normalize=False, **kw)
    assert torch.equal(out, base)


@pytest.mark.parametrize("name", sorted(TA_FAMILY))
def test_no_models_returns_base(name):
    base = rand(5)
    assert torch.equal(ta_call(name, [], base, weight=[]), base)


def test_task_arithmetic_single_model():  # item 16
    base = rand(500, seed=1)
    x = base + rand(500, seed=2, scale=0.01)  # a fine-tune: X - B is exact (Sterbenz)
    assert ulp_close(task_arithmetic.task_arithmetic([x], base, weight=[1.0]), x)
    bb, xb = base.bfloat16(), x.bfloat16()
    out = task_arithmetic.task_arithmetic([xb], bb, weight=[1.0]).float()
    # bf16: X - B is rounded (half an ulp of the delta), then B + delta (half an ulp of X)
    delta = (xb.float() - bb.float()).abs()
    assert bool(((out - xb.float()).abs() <= 2 ** -8 * (delta + xb.float().abs())).all())


def test_task_arithmetic_vector():  # item 17
    x = rand(100, seed=9)
    base = torch.zeros(100)
    out = task_arithmetic.task_arithmetic([x, 2 * x], base, weight=[0.5, 0.25], lambda_=2.0)
    assert torch.allclose(out, 2 * x, rtol=1e-6, atol=0)
    out = task_arithmetic.task_arithmetic([x, 2 * x], base, weight=[0.5, 0.25], normalize=True)
    assert torch.allclose(out, x * (0.5 + 0.5) / 0.75, rtol=1e-6, atol=0)


def test_task_arithmetic_weight_zero_gives_base():
    base, x = rand(30, seed=1, dtype=torch.bfloat16), rand(30, seed=2, dtype=torch.bfloat16)
    assert torch.equal(task_arithmetic.task_arithmetic([x], base, weight=[0.0]), base)


def test_ties_sign_election_vector():  # item 18
    base = torch.zeros(4)
    x1, x2 = torch.tensor([1.0, -1.0, 2.0, 0.0]), torch.tensor([-1.0, -1.0, 1.0, 0.0])
    out = ties.ties([x1, x2], base, weight=[1.0, 1.0], density=1.0)
    assert torch.equal(out, torch.tensor([1.0, -1.0, 1.5, 0.0]))
    # the divisor is the sum of the agreeing weights (disjoint mean)
    out = ties.ties([x1, x2], base, weight=[1.0, 3.0], density=1.0)
    assert torch.allclose(out, torch.tensor([-1.0, -1.0, 5 / 4, 0.0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("density", [0.05, 0.3, 0.9])
def test_magnitude_keeps_exactly_k(dtype, density):  # item 19
    delta = rand(997, 13, seed=11, dtype=dtype)
    k = max(1, int(density * delta.numel()))
    out = sparsify.magnitude(delta.clone(), density)
    assert int((out != 0).sum()) == k
    kept_min = out[out != 0].abs().min()
    dropped = delta[out == 0].abs()
    assert bool((dropped <= kept_min).all())


def test_magnitude_tiny_density_keeps_one():  # item 19
    delta = torch.arange(1.0, 11.0)
    out = sparsify.magnitude(delta.clone(), 0.05)
    assert torch.equal(out, torch.tensor([0.0] * 9 + [10.0]))
    assert torch.equal(sparsify.magnitude(delta.clone(), 0.0), torch.zeros(10))
    assert torch.equal(sparsify.magnitude(delta.clone(), 1.0), delta)


def test_bf16_histogram_threshold_ties_keep_exactly_k_lowest_indices():
    # few distinct magnitudes: ties at the threshold are broken by ascending flat index
    g = torch.Generator().manual_seed(3)
    levels = torch.tensor([0.5, 1.0, 1.5, 2.0, -1.0, -2.0])
    delta = levels[torch.randint(0, 6, (600_000,), generator=g)].to(torch.bfloat16)
    for density in (0.1, 0.37, 0.8):
        k = int(density * delta.numel())
        out = sparsify.magnitude(delta.clone(), density)
        assert int((out != 0).sum()) == k
        mags = delta.float().abs()
        tau = mags.sort(descending=True).values[k - 1]
        above = mags > tau
        assert bool((out[above] == delta[above]).all())
        tied_idx = (mags == tau).nonzero().squeeze(1)
        n_tied_kept = k - int(above.sum())
        kept_tied = (out[tied_idx] != 0)
        assert bool(kept_tied[:n_tied_kept].all()) and not bool(kept_tied[n_tied_kept:].any())


def ties_reference(xs, base, weights, densities, normalize=True):
    """Straightforward float64 NumPy TIES with a full sort (test oracle)."""
    b = base.double().numpy().ravel()
    ds = []
    for x, w, d in zip(xs, weights, densities):
        delta = x.double().numpy().ravel() - b
        k = max(1, int(d * delta.size))
        keep = np.zeros(delta.size, bool)
        keep[np.argsort(-np.abs(delta), kind="stable")[:k]] = True
        ds.append(np.where(keep, delta, 0.0) * w)
    ds = np.stack(ds)
    sign = np.where(ds.sum(0) >= 0, 1.0, -1.0)
    agree = np.sign(ds) == sign
    mixed = (ds * agree).sum(0)
    if normalize:
        div = (np.array(weights)[:, None] * agree).sum(0)
        mixed = mixed / np.where(div == 0, 1.0, div)
    return (b + mixed).reshape(base.shape)


def test_ties_matches_sort_based_reference():
    base = rand(200, 77, seed=20)
    xs = [base + rand(200, 77, seed=21 + i, scale=0.1) for i in range(3)]
    w, d = [0.5, 1.2, 0.8], [0.2, 0.5, 0.35]
    ref = ties_reference(xs, base, w, d)
    out = ties.ties(xs, base, weight=w, density=d)
    assert np.allclose(out.double().numpy(), ref, rtol=1e-6, atol=1e-6)
    ref = ties_reference(xs, base, w, d, normalize=False)
    out = ties.ties(xs, base, weight=w, density=d, normalize=False)
    assert np.allclose(out.double().numpy(), ref, rtol=1e-6, atol=1e-6)


def test_ties_lazy_and_eager_pruning_agree_bf16():
    base = rand(700, 300, seed=30, dtype=torch.bfloat16)
    xs = [(base.float() + rand(700, 300, seed=31 + i, scale=0.01)).bfloat16() for i in range(3)]
    w, d = [0.5, 0.3, 0.7], 0.3
    lazy = ties.ties(xs, base, weight=w, density=d)
    eager_deltas = [sparsify.magnitude((x - base), d) for x in xs]
    eager = task_arithmetic_from_deltas(eager_deltas, base, w)
    assert torch.equal(lazy, eager)


def task_arithmetic_from_deltas(deltas, base, w):
    from mixcli_merge.generalized import merge_task_vectors
    return merge_task_vectors([base + 0 * d for d in deltas], base, weight=w, lambda_=1.0,
                              normalize=True, consensus=True,
                              sparsify=lambda i, _d: deltas[i].clone())


@pytest.mark.parametrize("name,normalize", [("ties", True), ("dare_ties", False),
                                            ("dare_linear", False)])
def test_density_one_equals_task_arithmetic(name, normalize):
    base = rand(300, 11, seed=40)
    xs = [base + rand(300, 11, seed=41 + i, scale=0.2) for i in range(3)]
    w = [0.6, 0.3, 1.1]
    out = ta_call(name, xs, base, weight=w, density=1.0, normalize=normalize)
    if name == "dare_linear":
        ref = task_arithmetic.task_arithmetic(xs, base, weight=w, normalize=normalize)
        assert torch.equal(out, ref)
    else:
        assert torch.equal(out, ties.ties(xs, base, weight=w, density=1.0, normalize=normalize))
    # without sign conflicts the elected sum is plain task arithmetic
    same = [base + rand(300, 11, seed=50, scale=0.2).abs() * (i + 1) for i in range(3)]
    out = ta_call(name, same, base, weight=w, density=1.0, normalize=normalize)
    ref = task_arithmetic.task_arithmetic(same, base, weight=w, normalize=normalize)
    assert torch.allclose(out, ref, rtol=1e-6, atol=1e-7)


def test_rescale_preserves_l1():  # item 20
    delta = torch.tensor([1.0, -2, 3, -4, 5, -6, 7, -8, 9, -10])
    out = sparsify.magnitude(delta.clone(), 0.25, rescale=True)
    expected = torch.zeros(10)
    expected[8], expected[9] = 9 * 55 / 19, -10 * 55 / 19
    assert torch.allclose(out, expected, rtol=1e-6)
    assert math.isclose(out[8].item(), 26.0526, rel_tol=1e-5)
    d = rand(5000, seed=3)
    for fn in (lambda t: sparsify.magnitude(t, 0.3, rescale=True),
               lambda t: dare_linear.dare_linear([t], torch.zeros_like(t), weight=[1.0], density=0.3, seed=0),
               lambda t: sparsify.magnitude_outliers(t, 0.3, 0.05, rescale=True),
               lambda t: sparsify.della(t, 0.5, 0.1, torch.Generator().manual_seed(0), rescale=True)):
        out = fn(d.clone())
        assert math.isclose(out.abs().sum().item(), d.abs().sum().item(), rel_tol=1e-6)
    tiny = torch.full((10,), 1e-9)  # L1 below 1e-7: no rescale; ties keep the lowest indices
    out = sparsify.magnitude(tiny.clone(), 0.5, rescale=True)
    assert torch.equal(out[:5], tiny[:5]) and torch.equal(out[5:], torch.zeros(5))


def test_breadcrumbs_vector():  # item 21
    delta = torch.tensor([1.0, -2, 3, -4, 5, -6, 7, -8, 9, -10])
    out = sparsify.magnitude_outliers(delta.clone(), 0.5, 0.1)
    assert torch.equal(out, torch.tensor([0.0, 0, 0, 0, 5, -6, 7, -8, 9, 0]))
    base = torch.zeros(10)
    out = breadcrumbs.breadcrumbs([delta], base, weight=[1.0], density=0.5, gamma=0.1)
    assert torch.equal(out, torch.tensor([0.0, 0, 0, 0, 5, -6, 7, -8, 9, 0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_breadcrumbs_gamma_zero_is_magnitude(dtype):  # item 21
    delta = rand(5003, seed=12, dtype=dtype)
    for d in (0.1, 0.5):
        assert torch.equal(sparsify.magnitude_outliers(delta.clone(), d, 0.0),
                           sparsify.magnitude(delta.clone(), d))


def test_breadcrumbs_matches_sort_reference():
    delta = rand(3001, seed=13)
    d, gamma = 0.4, 0.07
    n = delta.numel()
    target, n_top = int(d * n), int(gamma * n)
    n_bot = max(0, n - target - n_top)
    order = np.argsort(np.abs(delta.numpy()), kind="stable")
    keep = np.zeros(n, bool)
    keep[order[n_bot:n_bot + target]] = True
    ref = np.where(keep, delta.numpy(), 0)
    assert np.array_equal(sparsify.magnitude_outliers(delta.clone(), d, gamma).numpy(), ref)


def binomial_ok(kept, n, p, sigmas=5):
    return abs(kept - n * p) <= sigmas * math.sqrt(n * p * (1 - p)) + 1


def test_dare_randomness_and_fraction():  # item 22
    base = rand(400, 250, seed=1)
    xs = [base + rand(400, 250, seed=2 + i, scale=0.1) for i in range(3)]
    w = [1.0, 1.0, 1.0]
    a = dare_linear.dare_linear(xs[:1], base, weight=w[:1], density=0.3, seed=7, rescale=False)
    b = dare_linear.dare_linear(xs[:1], base, weight=w[:1], density=0.3, seed=7, rescale=False)
    c = dare_linear.dare_linear(xs[:1], base, weight=w[:1], density=0.3, seed=8, rescale=False)
    assert torch.equal(a, b) and not torch.equal(a, c)
    n = base.numel()
    kept = int((a != base).sum())
    assert binomial_ok(kept, n, 0.3)
    delta = xs[0] - base
    resc = dare_linear.dare_linear(xs[:1], base, weight=w[:1], density=0.3, seed=1, rescale=True) - base
    assert math.isclose(resc.abs().sum().item(), delta.abs().sum().item(), rel_tol=1e-5)
    out = dare_ties.dare_ties(xs, base, weight=w, density=0.5, seed=3)
    assert binomial_ok(int((out == base).sum()), n, 0.5 ** 3)
    # models are drawn independently: swapping two models swaps nothing else
    assert torch.equal(dare_ties.dare_ties(xs, base, weight=w, density=0.5, seed=3), out)


def test_dare_bf16_keep_probability_is_rounded_density():
    assert sparsify._keep_probability(0.3, torch.bfloat16) == 0.30078125
    assert sparsify._keep_probability(0.3, torch.float32) == float(np.float32(0.3))


def test_della_validation_and_ranking():  # item 23
    base = torch.zeros(200, 1000)
    x = rand(200, 1000, seed=5)
    with pytest.raises(MixcliError, match="epsilon"):
        della.della([x], base, weight=[1.0], density=0.1, epsilon=0.15, seed=1)
    with pytest.raises(MixcliError, match="epsilon"):
        della_linear.della_linear([x], base, weight=[1.0], density=0.9, epsilon=0.15, seed=1)
    pruned = sparsify.della(x.clone(), 0.5, 0.3, torch.Generator().manual_seed(4))
    kept = pruned != 0
    per_row = kept.float().mean(1)
    assert bool(((per_row - 0.5).abs() < 5 * math.sqrt(0.25 / 1000)).all())
    # larger magnitudes are kept more often
    order = x.abs().argsort(dim=1)
    ranked = torch.gather(kept.float(), 1, order)
    low, high = ranked[:, :200].mean().item(), ranked[:, -200:].mean().item()
    assert high > low + 0.4  # expected ~0.8 vs ~0.2
    assert torch.equal(sparsify.della(x.clone(), 0.0, 0.1, None), torch.zeros_like(x))


def test_della_length_one_rows_are_unpruned():
    x = rand(50, 1, seed=2)
    assert torch.equal(sparsify.della(x.clone(), 0.5, 0.1, torch.Generator().manual_seed(0)), x)
    out = della.della([x], torch.zeros(50, 1), weight=[1.0], density=0.5, epsilon=0.1, seed=0)
    assert torch.allclose(out, x)


@pytest.mark.parametrize("name", ["ties", "dare_ties", "breadcrumbs_ties", "della"])
def test_int8_mask_changes_nothing(name):  # item 24
    base = rand(120, 40, seed=1, dtype=torch.bfloat16)
    xs = [(base.float() + rand(120, 40, seed=2 + i, scale=0.1)).bfloat16() for i in range(3)]
    kw = dict(weight=[0.5, 0.7, 0.2], density=0.5)
    assert torch.equal(ta_call(name, xs, base, int8_mask=True, **kw),
                       ta_call(name, xs, base, int8_mask=False, **kw))


@pytest.mark.parametrize("name", sorted(TA_FAMILY))
def test_family_keeps_dtype_and_inputs(name):
    base = rand(64, 64, seed=1, dtype=torch.bfloat16)
    xs = [(base.float() + rand(64, 64, seed=2 + i, scale=0.1)).bfloat16() for i in range(2)]
    copies = [t.clone() for t in xs + [base]]
    out = ta_call(name, xs, base, weight=[0.5, 0.5], density=0.5)
    assert out.dtype == torch.bfloat16 and out.shape == base.shape
    for t, c in zip(xs + [base], copies):
        assert torch.equal(t, c)


# ---------------------------------------------------------------- model_stock, passthrough (26-27)

def test_model_stock_vectors():  # item 26
    base = torch.tensor([1.0, 1, 1, 1])
    out = model_stock.model_stock([torch.tensor([2.0, 1, 1, 1]), torch.tensor([1.0, 2, 1, 1])], base)
    assert torch.equal(out, base)
    out = model_stock.model_stock([torch.tensor([2.0, 1, 1, 1]), torch.tensor([2.0, 2, 1, 1])], base)
    t = 2 * (1 / math.sqrt(2)) / (1 + 1 / math.sqrt(2))
    assert math.isclose(t, 0.8284, rel_tol=1e-4)
    assert torch.allclose(out, torch.tensor([1.8284, 1.4142, 1.0, 1.0]), atol=1e-4)
    x = rand(30, 8, seed=3)
    base = rand(30, 8, seed=4)
    assert torch.allclose(model_stock.model_stock([x, x.clone(), x.clone()], base), x, atol=1e-6)
    assert torch.allclose(model_stock.model_stock([x, x.clone()], base, filter_wise=True), x, atol=1e-6)


def test_model_stock_filter_wise_rows():
    base = torch.ones(2, 4)
    x1 = torch.tensor([[2.0, 1, 1, 1], [2.0, 1, 1, 1]])
    x2 = torch.tensor([[1.0, 2, 1, 1], [2.0, 2, 1, 1]])
    out = model_stock.model_stock([x1, x2], base, filter_wise=True)
    assert torch.equal(out[0], base[0])
    assert torch.allclose(out[1], torch.tensor([1.8284, 1.4142, 1.0, 1.0]), atol=1e-4)


def test_passthrough():  # item 27
    x = rand(10, 3, seed=1, dtype=torch.bfloat16)
    assert torch.equal(passthrough.passthrough([x], None), x)
    assert torch.equal(passthrough.passthrough([x], None, scale=[None]), x)
    assert torch.equal(passthrough.passthrough([x], None, scale=[0.5]), x * 0.5)
    ints = torch.arange(5)
    assert torch.equal(passthrough.passthrough([ints], None, scale=[2.0]), ints)


def test_hookimpl_is_marked():
    assert hasattr(mixcli_merge.register_merge_methods, "mixcli_impl")


def dare_reference(delta, density, gen, rescale):
    """DARE on a whole stored task vector: one float32 uniform per entry, drawn in the
    sparsifier's chunk order, compared with the density; L1 restored over the whole tensor."""
    uniforms = torch.cat([torch.rand(min(sparsify.CHUNK, delta.numel() - a), generator=gen)
                          for a in range(0, delta.numel(), sparsify.CHUNK)])
    out = delta * (uniforms.view(delta.shape) < density)
    return out * (delta.abs().sum() / out.abs().sum()) if rescale else out


def test_dare_masks_are_seeded_by_seed_tensor_name_and_model_position(tmp_path, llama_family):
    """As the README says: listing the models in another order draws other masks."""
    from click.testing import CliRunner

    import tiny_models
    from mixcli.cli import cli
    from mixcli.seeding import derive_seed, generator

    name = "model.layers.1.mlp.up_proj.weight"
    tensors = {m: tiny_models.load_tensors(llama_family[m])[name] for m in ("base", "ft1", "ft2")}
    for order in (("ft1", "ft2"), ("ft2", "ft1")):
        models = "\n".join(f'{m} = "{llama_family[m]}"' for m in ("base", *order))
        (tmp_path / "p.toml").write_text(f'[models]\n{models}\n[method]\nname = "dare_linear"\nbase = "base"\n'
                                         'weight = 1.0\ndensity = 0.5\nrescale = false\nseed = 7\n'
                                         f'[output]\npath = "{"-".join(order)}"\n')
        result = CliRunner().invoke(cli, ["merge", str(tmp_path / "p.toml")])
        assert result.exit_code == 0, result.output
        merged = tiny_models.load_tensors(tmp_path / "-".join(order))[name]
        base = tensors["base"]
        expected = base + sum(dare_reference(tensors[m] - base, 0.5, generator(derive_seed(7, name), i), False)
                              for i, m in enumerate(order))
        assert torch.allclose(merged, expected, atol=1e-6)
    assert not torch.equal(tiny_models.load_tensors(tmp_path / "ft1-ft2")[name],
                           tiny_models.load_tensors(tmp_path / "ft2-ft1")[name])


@pytest.mark.parametrize("rescale", [False, True])
def test_dare_streams_the_same_mask_as_a_whole_tensor_reference(rescale):
    # over several chunks: the lazy mask is regenerated, never stored, and must match
    base = rand(700, 1000, seed=21)
    x = base + rand(700, 1000, seed=22, scale=0.1)
    out = dare_linear.dare_linear([x], base, weight=[1.0], density=0.4, seed=5, rescale=rescale)
    from mixcli.seeding import generator
    eager = dare_reference(x - base, 0.4, generator(5, 0), rescale)
    assert torch.allclose(out, base + eager, rtol=1e-6, atol=1e-6)  # base + delta rounding
    assert int(((out - base) != 0).sum()) == int((eager != 0).sum())
