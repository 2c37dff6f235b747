"""nuslerp, multislerp, karcher, sce, nearswap, arcee_fusion, ram and ramplus_tl: the test
vectors of the spec (merge-methods-more.md §2, mergekit 0.1.5's own outputs), invariants,
whole merges of the tiny Llamas, bad parameters, and parity with mergekit when its venv exists."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import tiny_models
from conftest import write_project
from mixcli import MixcliError
from mixcli.cli import cli
from mixcli.plugins import get_registry
from mixcli.seeding import derive_seed
from mixcli_merge import arcee_fusion, karcher, multislerp, nearswap, nuslerp, ram, ramplus_tl, sce, slerp

F32, BF16 = torch.float32, torch.bfloat16
NAN = float("nan")


def vec(*values, dtype=F32):
    return torch.tensor(values, dtype=dtype)


e1, e2, e3 = vec(1, 0, 0), vec(0, 1, 0), vec(0, 0, 1)
B = vec(1, 1, 1)


def same(out, *expected, dtype=F32):
    """Bitwise equal (NaN equal to NaN) to the printed float32 values of the spec."""
    want = torch.tensor(expected, dtype=dtype) if not isinstance(expected[0], torch.Tensor) else expected[0]
    assert out.dtype == want.dtype and out.shape == want.shape, (out, want)
    assert torch.equal(out.nan_to_num(123.0), want.nan_to_num(123.0)), (out.tolist(), want.tolist())


def rand(*shape, seed=0, dtype=F32, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def ulps(a, b):
    """max |a - b| in units of the last place of each entry's larger magnitude (float32)."""
    spacing = torch.finfo(a.dtype).eps * torch.maximum(a.abs(), b.abs()).clamp(min=torch.finfo(a.dtype).tiny)
    return float(((a - b).abs() / spacing).max())


def scaled_ulps(a, b):
    """max |a - b| in units of the last place of the tensor's largest magnitude."""
    return float((a - b).abs().max() / (torch.finfo(a.dtype).eps * b.abs().max()))


# ---------------------------------------------------------------- records and parameters

def test_records_contracts_and_defaults():
    methods = get_registry().methods
    contracts = {  # base, min inputs, max inputs, random
        "nuslerp": ("optional", 2, 2, False), "multislerp": ("optional", 1, None, False),
        "karcher": ("ignored", 1, None, False), "sce": ("required", 1, None, False),
        "nearswap": ("required", 1, 1, False), "arcee_fusion": ("required", 1, 1, True),
        "ram": ("required", 1, None, False), "ramplus_tl": ("required", 1, None, False),
    }
    for name, (base, low, high, random) in contracts.items():
        m = methods[name]
        assert (m.base, m.min_inputs, m.max_inputs, m.random) == (base, low, high, random), name
    defaults = {
        "nuslerp": {"weight": "required", "nuslerp_flatten": True, "nuslerp_row_wise": False},
        "multislerp": {"weight": "required", "normalize_weights": True, "eps": 1e-8},
        "karcher": {"max_iter": 10, "tol": 1e-5},
        "sce": {"select_topk": 1.0, "int8_mask": False},
        "nearswap": {"t": "required"},
        "arcee_fusion": {},
        "ram": {"epsilon": 1e-5},
        "ramplus_tl": {"r": 0.1, "alpha": 0.2, "epsilon": 1e-5},
    }
    for name, params in defaults.items():
        specs = methods[name].param_specs
        assert set(specs) == set(params), name
        for key, default in params.items():
            assert (repr(specs[key].default) if specs[key].required else specs[key].default) == default
            assert specs[key].per_model == (key == "weight"), (name, key)
    assert methods["karcher"].param_specs["max_iter"].type is int


# ---------------------------------------------------------------- nuslerp (§2.1)

@pytest.mark.parametrize("inputs, base, weight, flags, expected", [
    ("N1", None, (1, 1), {}, [0.7071067691, 0.7071067691, 0]),
    ("N2", None, (3, 1), {}, [0.9238795638, 0.3826834559, 0]),
    ("N3", None, (1, 1), {}, [1.414213538, 0.7071067691, 0]),
    ("N4", B, (1, 1), {}, [1.707106829, 1.707106829, 1]),
    ("N5", B, (1, 1), {}, [1, 1.707106829, 1]),
    ("N6", None, (3, 1), {}, [0.5, 0, 0]),
    ("N7", None, (1, -1), {}, [0.7071067691, 0.7071067691, 0]),
    ("N8", None, (2, -1), {}, [-8.742277657e-08, -1, -0.0]),
    ("N9", None, (1, 1), {}, [[0.5534320474, 0.5534320474], [0, 1.660296202]]),
    ("N10", None, (1, 1), {"nuslerp_flatten": False}, [[0.7071067691, 0.7071067691], [0, 1.5]]),
    ("N11", None, (1, 1), {"nuslerp_flatten": False, "nuslerp_row_wise": True},
     [[0.7071067691, 0.5137431622], [0, 1.541229486]]),
])
def test_nuslerp_vectors(inputs, base, weight, flags, expected):
    m0, m1 = vec(1, 0, 0, 1).view(2, 2), vec(0, 1, 0, 2).view(2, 2)
    pairs = {"N1": (e1, e2), "N2": (e1, e2), "N3": (2 * e1, e2), "N4": (B + e1, B + e2), "N5": (B, B + e2),
             "N6": (e1, -e1), "N7": (e1, e2), "N8": (e1, e2), "N9": (m0, m1), "N10": (m0, m1), "N11": (m0, m1)}
    out = nuslerp.nuslerp(list(pairs[inputs]), base, weight=list(weight), **flags)
    same(out, *expected)
    if inputs == "N8":
        assert math.copysign(1, float(out[2])) == -1  # mergekit writes -0


def test_nuslerp_bf16_vector():  # N12
    out = nuslerp.nuslerp([e1.to(BF16), e2.to(BF16)], None, weight=[1, 1])
    same(out, 0.70703125, 0.70703125, 0, dtype=BF16)


def test_nuslerp_endpoints_and_identical_inputs():
    a, b, base = rand(64, 64, seed=1), rand(64, 64, seed=2), rand(64, 64, seed=3)
    assert ulps(nuslerp.nuslerp([a, b], None, weight=[1, 0]), a) <= 1
    assert ulps(nuslerp.nuslerp([a, b], None, weight=[0, 1]), b) <= 1
    assert ulps(nuslerp.nuslerp([a, a], None, weight=[0.3, 0.7]), a) <= 1
    d = rand(64, 64, seed=4, scale=0.1)
    x = base + d
    assert scaled_ulps(nuslerp.nuslerp([x, x], base, weight=[1, 2]), x) <= 2  # (x - base) + base rounds
    # X_1 = B: the zero task vector has no direction, so theta = pi/2 and out = B + sin(t pi/2) d
    t = 2 / 3
    out = nuslerp.nuslerp([base, base + d], base, weight=[1, 2])
    assert torch.allclose(out, base + math.sin(t * math.pi / 2) * d, rtol=0, atol=1e-6)


def test_nuslerp_agrees_with_slerp_away_from_collinearity():
    a, b = rand(50, 40, seed=5), rand(50, 40, seed=6)
    ours = nuslerp.nuslerp([a, b], None, weight=[0.75, 0.25])
    theirs = slerp.slerp([b], a, t=0.25)
    assert scaled_ulps(ours, theirs) <= 8


def test_nuslerp_rows_and_columns_are_flattened_nuslerp_per_vector():
    a, b = rand(6, 5, seed=7), rand(6, 5, seed=8)
    rows = nuslerp.nuslerp([a, b], None, weight=[1, 2], nuslerp_flatten=False)
    for i in range(6):
        assert torch.equal(rows[i], nuslerp.nuslerp([a[i], b[i]], None, weight=[1, 2]))
    columns = nuslerp.nuslerp([a, b], None, weight=[1, 2], nuslerp_flatten=False, nuslerp_row_wise=True)
    transposed = nuslerp.nuslerp([a.T.contiguous(), b.T.contiguous()], None, weight=[1, 2], nuslerp_flatten=False)
    assert torch.equal(columns, transposed.T)


# ---------------------------------------------------------------- multislerp (§2.2)

@pytest.mark.parametrize("inputs, base, weight, flags, expected", [
    ("MS1", None, (0.5, 0.5), {}, [0.7071067691, 0.7071067691, 0]),
    ("MS2", None, (0.75, 0.25), {}, [0.9486833215, 0.3162277639, 0]),
    ("MS3", None, (1, 1), {}, [1.060660124, 1.060660124, 0]),
    ("MS4", None, (1, 1), {"normalize_weights": False}, [2.121320486, 2.121320486, 0]),
    ("MS5", None, (1, 2, 3), {}, [0.2672612667, 0.5345225334, 0.8017836809]),
    ("MS6", None, (0.3,), {}, [2, 0, 0]),
    ("MS7", B, (1, 1), {}, [1.707106829, 1.707106829, 1]),
    ("MS8", None, (1, 1), {}, [0, 0, 0]),
    ("MS9", None, (1, 1), {}, [0.5, 0, 0]),
    ("MS10", None, (1, -1), {"normalize_weights": False}, None),
])
def test_multislerp_vectors(inputs, base, weight, flags, expected):
    sets = {"MS1": (e1, e2), "MS2": (e1, e2), "MS3": (2 * e1, e2), "MS4": (2 * e1, e2), "MS5": (e1, e2, e3),
            "MS6": (2 * e1,), "MS7": (B + e1, B + e2), "MS8": (e1, -e1), "MS9": (0 * e1, e1), "MS10": (e1, e2)}
    out = multislerp.multislerp(list(sets[inputs]), base, weight=list(weight), **flags)
    if expected is not None:
        same(out, *expected)
    else:  # MS10 without normalising: finite (mergekit's NaN comes from normalising a zero sum)
        assert torch.isfinite(out).all()


def test_multislerp_bf16_vector():  # MS11
    out = multislerp.multislerp([e1.to(BF16), e2.to(BF16)], None, weight=[0.75, 0.25])
    same(out, 0.9453125, 0.31640625, 0, dtype=BF16)


def test_multislerp_zero_weight_sum_and_balanced_opposites_are_errors():
    with pytest.raises(MixcliError, match="weights sum to zero"):  # MS10: mergekit writes NaN
        multislerp.multislerp([e1, e2], None, weight=[1, -1])
    with pytest.raises(MixcliError, match="weights sum to zero"):
        multislerp.METHOD.check(weight=[1.0, -1.0])
    with pytest.raises(MixcliError, match="weighted mean direction of the models is zero"):
        multislerp.multislerp([e1, -e1, 0 * e1], None, weight=[1, 1, 1])


def test_multislerp_norm_direction_and_permutation():
    xs = [rand(30, 20, seed=i, scale=0.5 + i) for i in range(3)]
    w = [0.2, 0.5, 0.3]
    out = multislerp.multislerp(xs, None, weight=w)
    norms = [float(x.norm()) for x in xs]
    assert math.isclose(float(out.norm()), sum(wi * n for wi, n in zip(w, norms)), rel_tol=1e-6)
    direction = sum(wi * x / (n + 1e-8) for wi, x, n in zip(w, xs, norms))
    assert torch.allclose(out / out.norm(), direction / direction.norm(), rtol=0, atol=1e-6)
    swapped = multislerp.multislerp([xs[2], xs[0], xs[1]], None, weight=[w[2], w[0], w[1]])
    assert scaled_ulps(swapped, out) <= 4


# ---------------------------------------------------------------- karcher (§2.3)

V = (e1 + e3) / math.sqrt(2)


@pytest.mark.parametrize("inputs, params, expected", [
    ("K1", {}, [0.7071067691, 0.7071067691, 0]),
    ("K2", {}, [1.060660124, 1.060660124, 0]),
    ("K3", {}, [0.3932186365, 0.9194449186]),
    ("K4/0", {"max_iter": 0}, [0.8125199676, 0.4759631455, 0.3365567625]),
    ("K4/1", {"max_iter": 1}, [0.7917847037, 0.515280664, 0.3279679716]),
    ("K4/2", {"max_iter": 2}, [0.7909550667, 0.5167711377, 0.3276243508]),
    ("K4/3", {"max_iter": 3}, [0.7909228206, 0.5168288946, 0.3276109695]),
    ("K4/10", {}, [0.7909228206, 0.5168288946, 0.3276109695]),
    ("K5", {}, [1.054563642, 0.6891051531, 0.4368146062]),
    ("K6", {}, [1, 0, 0]),
    ("K7", {}, [1, 0, 0]),
    ("K8", {"tol": 1.0}, [0, 0, 0]),
    ("K9", {}, [3, 0, 0]),
])
def test_karcher_vectors(inputs, params, expected):
    angles = [vec(math.cos(a), math.sin(a)) for a in (0, 1, 2.5)]
    sets = {"K1": (e1, e2), "K2": (2 * e1, e2), "K3": angles, "K4/0": (e1, e2, V), "K4/1": (e1, e2, V),
            "K4/2": (e1, e2, V), "K4/3": (e1, e2, V), "K4/10": (e1, e2, V), "K5": (2 * e1, e2, V),
            "K6": (0 * e1, 2 * e1), "K7": (e1, -e1), "K8": (e1, e2), "K9": (3 * e1,)}
    same(karcher.karcher(list(sets[inputs]), None, **params), *expected)


def test_karcher_bf16_identical_and_max_iter_zero_is_multislerp():
    same(karcher.karcher([e1.to(BF16), e2.to(BF16)], None), 0.70703125, 0.70703125, 0, dtype=BF16)
    x = rand(40, 30, seed=9)
    assert ulps(karcher.karcher([x, x, x], None), x) <= 2
    xs = [rand(40, 30, seed=10 + i, scale=1 + i) for i in range(3)]
    start = karcher.karcher(xs, None, max_iter=0)
    equal = multislerp.multislerp(xs, None, weight=[1, 1, 1])
    assert torch.allclose(start, equal, rtol=1e-5, atol=1e-6)
    out = karcher.karcher(xs, None)
    assert math.isclose(float(out.norm()), sum(float(x.norm()) for x in xs) / 3, rel_tol=1e-6)
    assert torch.equal(karcher.karcher(xs, None, max_iter=50), karcher.karcher(xs, None, max_iter=500))


# ---------------------------------------------------------------- sce (§2.4)

X1, X2, X3 = vec(3, -1, 2, 0), vec(1, 2, -2, 0), vec(1, 1, 1, 1)
Z = torch.zeros(4)


@pytest.mark.parametrize("inputs, base, params, expected, scale", [
    ("S1", Z, {}, [2.217391253, 2, 2, 0], 1),
    ("S2", Z, {"select_topk": 0.5}, [0, 0, 2, 0], 1),
    ("S3", Z, {}, [2.037037134, 1.692307591, 1.77777791, 1], 1),
    ("S4", Z + 1, {}, [3.217391253, 3, 3, 1], 1),
    ("S5", Z, {}, [3, -1, 2, 0], 1),
    ("S6", Z, {"select_topk": 0.5}, [0, 0, 0, 0], 1),
    ("S7", Z, {}, [2, 2, 2, 0], 1e-4),
    ("S8", Z, {"select_topk": 0.0}, [0, 0, 0, 0], 1),
])
def test_sce_vectors(inputs, base, params, expected, scale):
    sets = {"S1": (X1, X2), "S2": (X1, X2), "S3": (X1, X2, X3), "S4": (X1 + 1, X2 + 1), "S5": (X1,),
            "S6": (X1,), "S7": (1e-4 * X1, 1e-4 * X2), "S8": (X1, X2)}
    out = sce.sce(list(sets[inputs]), base, **params)
    if scale != 1:  # S7: equal weights below the 1e-6 sum of mean squares
        assert torch.allclose(out / scale, vec(*expected), rtol=1e-5, atol=0)
    else:
        same(out, *expected)


def test_sce_invariants():
    base = rand(33, 17, seed=11)
    xs = [base + rand(33, 17, seed=12 + i, scale=0.1) for i in range(3)]
    for dtype in (F32, BF16):
        args = [x.to(dtype) for x in xs], base.to(dtype)
        for topk in (1.0, 0.3):
            assert torch.equal(sce.sce(*args, select_topk=topk, int8_mask=True),
                               sce.sce(*args, select_topk=topk))
    out = sce.sce(xs, base)
    assert scaled_ulps(sce.sce([xs[2], xs[0], xs[1]], base), out) <= 2
    assert scaled_ulps(sce.sce([xs[0]] * 3, base), xs[0]) <= 2  # identical task vectors: X


# ---------------------------------------------------------------- nearswap (§2.5)

def test_nearswap_vectors_and_bound():
    a = vec(0, 0, 0, 0, 1, 1)
    b = vec(0.05, -0.2, 1.0, 0.0, 1.0000005, 0.9)
    same(nearswap.nearswap([b], a, t=0.1), 0.05000000075, -0.1000000015, 0.1000000015, 0, 1.000000477, 0.8999999762)
    same(nearswap.nearswap([b], a, t=0.0), a)
    same(nearswap.nearswap([b], a, t=1e-7), 1.000000012e-07, -1.000000012e-07, 1.000000012e-07, 0, 1.0, 0.9999998808)
    base, other = rand(50, 50, seed=13), rand(50, 50, seed=14)
    for t in (1e-3, 0.1, 1.0):
        out = nearswap.nearswap([other], base, t=t)
        assert bool(((out - base).abs() <= t * (1 + 2 ** -22) + torch.finfo(F32).eps * base.abs()).all())
    far = nearswap.nearswap([other], base, t=float((other - base).abs().max()) * 2)
    assert ulps(far, other) <= 1


# ---------------------------------------------------------------- arcee_fusion (§2.6)

def test_arcee_fusion_vectors():
    af1 = vec(0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 1.0)
    same(arcee_fusion.arcee_fusion([af1], torch.zeros(8)), 0, 0, 0, 0, 0, 0, 0, 1)
    af2 = vec(1, 0, 0, 0, 0, 0, 0, 0.5).view(2, 4)
    same(arcee_fusion.arcee_fusion([af2], torch.zeros(2, 4)), af2)
    b3 = vec(0, 0, 0, 0, 1, 2, 3, 4).view(2, 4)
    x3 = b3.clone()
    x3[1] += 1
    same(arcee_fusion.arcee_fusion([x3], b3), vec(0, 0, 0, 0, 2, 3, 4, 5).view(2, 4))
    # AF4: mergekit returns float32 for bf16; mixcli rounds it to the working dtype
    same(arcee_fusion.arcee_fusion([af1.to(BF16)], torch.zeros(8, dtype=BF16)), 0, 0, 0, 0, 0, 0, 0, 1, dtype=BF16)


def test_arcee_fusion_keeps_outliers_by_importance():
    base = rand(16, 32, seed=15)
    x = base + rand(16, 32, seed=16, scale=0.05)
    out = arcee_fusion.arcee_fusion([x], base)
    kept = out != base
    assert 0 < int(kept.sum()) < kept.numel() // 2
    assert torch.equal(out[kept], x[kept])
    p, q = torch.softmax(x, -1) + 1e-8, torch.softmax(base, -1) + 1e-8
    importance = (x - base).abs() * (p * (p / q).log()).sum(-1, keepdim=True)
    ordered = importance.flatten().sort().values
    q1, q2, q3 = (ordered[int(f * (ordered.numel() - 1))] for f in (0.25, 0.5, 0.75))
    assert torch.equal(kept, importance >= q2 + 1.5 * (q3 - q1))


def test_arcee_fusion_samples_large_tensors_by_seed():
    base = rand(1100, 1000, seed=17)
    x = base + rand(1100, 1000, seed=18, scale=0.05)
    one = arcee_fusion.arcee_fusion([x], base, seed=1)
    assert torch.equal(one, arcee_fusion.arcee_fusion([x], base, seed=1))
    other = arcee_fusion.arcee_fusion([x], base, seed=2)
    assert not torch.equal(one, other)  # another sample, another threshold
    assert abs(int((one != base).sum()) - int((other != base).sum())) < 0.01 * base.numel()


# ---------------------------------------------------------------- ram, ramplus_tl (§2.7, §2.8)

RV1, RV2 = vec(0.5, 0, 0.2, 5e-6, -0.3), vec(0, 0, 0.4, 2e-5, 0.3)
Z5 = torch.zeros(5)


def test_ram_vectors():
    same(ram.ram([RV1, RV2], Z5), 0.5, 0, 0.3000000119, 1.999999949e-05, 0)  # R1
    same(ramplus_tl.ramplus_tl([RV1, RV2], Z5), 0.5099999905, 0, 0.3000000119, 2.03999989e-05, 0)  # R2
    same(ramplus_tl.ramplus_tl([RV1, RV2], Z5, r=1, alpha=10), 1.5, 0, 0.3000000119, 5.999999848e-05, 0)  # R3
    same(ram.ram([RV1], Z5), 0.5, 0, 0.200000003, 0, -0.3000000119)  # R4
    same(ram.ram([RV1, RV2], Z5, epsilon=-1), 0.25, 0, 0.3000000119, 1.249999968e-05, 0)  # R5
    # R7: mergekit's float32 result for bf16 inputs, rounded to bf16 by mixcli
    r7 = ramplus_tl.ramplus_tl([RV1.to(BF16), RV2.to(BF16)], Z5.to(BF16))
    same(r7, vec(0.5099999905, 0, 0.3002929688, 2.042770393e-05, 0).to(BF16))
    same(ram.ram([RV1.to(BF16), RV2.to(BF16)], Z5.to(BF16)), 0.5, 0, 0.30078125, 2.002716064e-05, 0, dtype=BF16)  # R8


def test_ram_invariants():
    base = rand(40, 40, seed=19)
    d1 = torch.where(torch.arange(1600).view(40, 40) % 2 == 0, rand(40, 40, seed=20, scale=0.1), 0)
    d2 = torch.where(torch.arange(1600).view(40, 40) % 2 == 1, rand(40, 40, seed=21, scale=0.1), 0)
    assert torch.equal(ram.ram([base + d1, base + d2], base), base + d1 + d2)  # disjoint supports
    x = base + d1
    assert torch.equal(ram.ram([x, x, x], base), ramplus_tl.ramplus_tl([x, x, x], base))
    assert torch.allclose(ram.ram([x, x, x], base), x, rtol=0, atol=1e-6)
    # disjoint supports: no shared entries, so rho = 0 and lambda = 1
    assert torch.equal(ramplus_tl.ramplus_tl([base + d1, base + d2], base), base + d1 + d2)


# ---------------------------------------------------------------- one model and dtypes

def test_single_model_behaviour():
    x, base = rand(20, 10, seed=22), rand(20, 10, seed=23)
    assert multislerp.multislerp([x], base, weight=[0.4]) is x
    assert karcher.karcher([x], None) is x
    assert torch.equal(sce.sce([x], base), base + (x - base))
    assert torch.equal(sce.sce([x], base, select_topk=0.5), base)
    small = base.clone()
    small[0, 0] += 1e-6
    assert torch.equal(ram.ram([small], base), base)  # |delta| <= epsilon keeps the base
    with pytest.raises(MixcliError, match="exactly two models"):
        nuslerp.nuslerp([x], None, weight=[1.0])
    for fn, kw in ((nearswap.nearswap, {"t": 0.1}), (arcee_fusion.arcee_fusion, {})):
        for others in ([], [x, x]):  # the base and exactly one other model
            with pytest.raises(MixcliError, match="exactly one other model"):
                fn(others, base, **kw)


@pytest.mark.parametrize("name, kwargs", [
    ("nuslerp", {"weight": [0.4, 0.6]}), ("multislerp", {"weight": [0.4, 0.6]}), ("karcher", {}),
    ("sce", {}), ("nearswap", {"t": 0.01}), ("arcee_fusion", {"seed": 0}), ("ram", {}), ("ramplus_tl", {}),
])
def test_results_keep_the_working_dtype(name, kwargs):
    method = get_registry().methods[name]
    base = rand(12, 8, seed=24, dtype=BF16)
    xs = [(base.float() + rand(12, 8, seed=25 + i, scale=0.1)).to(BF16) for i in range(2)]
    if method.max_inputs == 1:
        xs = xs[:1]
    out = method.merge(xs, None if method.base == "ignored" else base, **kwargs)
    assert out.dtype == BF16 and out.shape == base.shape and torch.isfinite(out).all()


# ---------------------------------------------------------------- whole merges

E2E = {
    "nuslerp": ('base = "base"', "weight = 0.5", {"weight": [0.5, 0.5]}),
    "multislerp": ("", "weight = 0.5", {"weight": [0.5, 0.5]}),
    "karcher": ("", "max_iter = 5", {"max_iter": 5}),
    "sce": ('base = "base"', "select_topk = 0.5", {"select_topk": 0.5}),
    "nearswap": ('base = "base"', "t = 0.001", {"t": 0.001}),
    "arcee_fusion": ('base = "base"', "", {}),
    "ram": ('base = "base"', "epsilon = 1e-4", {"epsilon": 1e-4}),
    "ramplus_tl": ('base = "base"', "r = 0.5", {"r": 0.5}),
}


@pytest.mark.parametrize("method", sorted(E2E))
def test_merge_of_tiny_llamas_equals_the_function_and_loads(method, tmp_path, llama_family):
    base_line, params, resolved = E2E[method]
    others = ["ft1"] if get_registry().methods[method].max_inputs == 1 else ["ft1", "ft2"]
    models = "\n".join(f'{m} = "{llama_family[m]}"' for m in ["base"] + others)
    if not base_line:  # base-less: the two fine-tunes only
        models = "\n".join(f'{m} = "{llama_family[m]}"' for m in others)
    project = write_project(tmp_path, f"""
[models]
{models}
[method]
name = "{method}"
{base_line}
{params}
[output]
path = "out"
""")
    result = CliRunner().invoke(cli, ["merge", str(project)])
    assert result.exit_code == 0, result.output
    merged = tiny_models.load_tensors(tmp_path / "out")
    record = get_registry().methods[method]
    for name in ("model.layers.1.mlp.up_proj.weight", "model.norm.weight", "lm_head.weight",
                 "model.embed_tokens.weight"):
        tensors = {m: tiny_models.load_tensors(llama_family[m])[name] for m in ["base"] + others}
        kwargs = dict(resolved)
        if record.random:
            kwargs["seed"] = derive_seed(0, name)
        want = record.merge([tensors[m] for m in others], tensors["base"] if base_line else None, **kwargs)
        assert torch.equal(merged[name], want.to(merged[name].dtype)), name
    logits = tiny_models.logits(tmp_path / "out")
    assert logits.shape[-1] == 52 and torch.isfinite(logits).all()


def test_bf16_merge_writes_bf16_for_the_float32_methods(tmp_path, llama_bf16_family):
    fam = llama_bf16_family
    for method in ("arcee_fusion", "ramplus_tl"):
        project = write_project(tmp_path, f"""
[models]
base = "{fam['base']}"
ft1 = "{fam['ft1']}"
[method]
name = "{method}"
base = "base"
[output]
path = "out-{method}"
""", name=f"{method}.toml")
        result = CliRunner().invoke(cli, ["merge", str(project)])
        assert result.exit_code == 0, result.output
        merged = tiny_models.load_tensors(tmp_path / f"out-{method}")
        assert {t.dtype for t in merged.values()} == {BF16}
        assert torch.isfinite(tiny_models.logits(tmp_path / f"out-{method}")).all()


# ---------------------------------------------------------------- bad parameters

def one_line_error(tmp_path, family, method, base_line, extra, models=None):
    models = models or f'base = "{family["base"]}"\nft1 = "{family["ft1"]}"\nft2 = "{family["ft2"]}"'
    project = write_project(tmp_path, f"""
[models]
{models}
[method]
name = "{method}"
{base_line}
{extra}
[output]
path = "out"
""")
    result = CliRunner().invoke(cli, ["merge", str(project)])
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()
    return lines[0]


@pytest.mark.parametrize("method, base_line, extra, fragments", [
    ("sce", 'base = "base"', "weight = 0.5", ["unknown parameter 'weight' for method 'sce'",
                                             "sce computes its own weights", "use select_topk"]),
    ("sce", 'base = "base"', "density = 0.3", ["unknown parameter 'density' for method 'sce'", "select_topk"]),
    ("sce", 'base = "base"', "select_topk = 1.5", ["parameter 'select_topk' must be <= 1.0"]),
    ("nearswap", 'base = "base"', "t = -0.1", ["parameter 't' must be >= 0.0"]),
    ("nearswap", 'base = "base"', "", ["parameter 't' has no value"]),
    ("ramplus_tl", 'base = "base"', "epsilon = 0", ["parameter 'epsilon' must be > 0.0"]),
    ("ram", 'base = "base"', "epsilon = -1", ["parameter 'epsilon' must be >= 0.0"]),
    ("ramplus_tl", 'base = "base"', "alpha = -1", ["parameter 'alpha' must be >= 0.0"]),
    ("karcher", "", "max_iter = 2.5", ["parameter 'max_iter' must be a whole number"]),
    ("karcher", "", "tol = 0", ["parameter 'tol' must be > 0.0"]),
    ("multislerp", "", "weight = [{ filter = 'mlp', value = 1.0 }, { value = 0.0 }]\nnormalize_weights = true",
     ["weights sum to zero"]),
    ("multislerp", "", "weight = 1.0\neps = 0", ["parameter 'eps' must be > 0.0"]),
    ("nuslerp", 'base = "base"', "", ["parameter 'weight' has no value"]),
    ("ram", "", "", ["method 'ram' needs a base model"]),
    ("arcee_fusion", 'base = "base"', "", ["method 'arcee_fusion' takes exactly 1 model(s) besides the base, got 2"]),
])
def test_bad_parameters_are_one_line_errors(tmp_path, llama_family, method, base_line, extra, fragments):
    models = None
    if method == "nearswap":  # the base and one other model, so the parameters are what is wrong
        models = f'base = "{llama_family["base"]}"\nft1 = "{llama_family["ft1"]}"'
    line = one_line_error(tmp_path, llama_family, method, base_line, extra, models=models)
    for fragment in fragments:
        assert fragment in line, line


def test_multislerp_zero_sum_names_the_tensor(tmp_path, llama_family):
    models = f'a = {{ path = "{llama_family["ft1"]}", weight = 1.0 }}\nb = {{ path = "{llama_family["ft2"]}", weight = -1.0 }}'
    line = one_line_error(tmp_path, llama_family, "multislerp", "", "", models=models)
    assert "tensor '" in line and "weights sum to zero" in line


# ---------------------------------------------------------------- parity with mergekit

MERGEKIT_PYTHON = Path(os.environ.get("MIXCLI_MERGEKIT_PYTHON", "/work/base/mergekit-venv/bin/python"))


def test_parity_with_mergekit():
    """Runs benchmarks/parity_mergekit.py for the eight methods in mergekit's venv: every row
    bit-identical, except arcee_fusion on tensors over 1e6 entries (random quartile sample)."""
    if not MERGEKIT_PYTHON.exists():
        pytest.skip(f"no mergekit venv at {MERGEKIT_PYTHON} (set MIXCLI_MERGEKIT_PYTHON)")
    root = Path(__file__).parent.parent
    env = dict(os.environ, PYTHONPATH=f"{root}{os.pathsep}{root / 'plugins' / 'mixcli-merge'}")
    names = ["nuslerp", "multislerp", "karcher", "sce", "nearswap", "arcee_fusion", "ram", "ramplus_tl"]
    result = subprocess.run([str(MERGEKIT_PYTHON), str(root / "benchmarks" / "parity_mergekit.py"), "--small", *names],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    seen = set()
    for line in result.stdout.splitlines()[1:]:
        name, (dtype, shape, max_diff, differing, _untied, *note) = line[:20].strip(), line[20:].split()
        seen.add(name.split()[0])
        if note:  # arcee_fusion above 1e6 entries: another random sample, another threshold
            assert "random quartile sample" in " ".join(note) and name == "arcee_fusion", line
            continue
        assert float(max_diff) == 0 and int(differing) == 0, line
    assert seen == set(names), result.stdout


@pytest.mark.parametrize("name, kwargs", [
    ("nuslerp", {"weight": [0.4, 0.6]}), ("nuslerp", {"weight": [0.4, 0.6], "nuslerp_flatten": False}),
    ("multislerp", {"weight": [0.4, 0.6]}), ("karcher", {}), ("sce", {"select_topk": 0.5}),
    ("nearswap", {"t": 0.01}), ("arcee_fusion", {"seed": 3}),
    ("ram", {}), ("ramplus_tl", {}),
])
def test_out_argument_gives_the_same_result(name, kwargs):
    method = get_registry().methods[name]
    assert method.accepts_out
    base = rand(64, 48, seed=30)
    xs = [base + rand(64, 48, seed=31 + i, scale=0.01) for i in range(2 if (method.max_inputs or 2) > 1 else 1)]
    base_arg = None if method.base == "ignored" else base
    want = method.merge(xs, base_arg, **kwargs)
    target = torch.full_like(base, NAN)
    got = method.merge(xs, base_arg, out=target, **kwargs)
    assert got is target and torch.equal(got, want)
