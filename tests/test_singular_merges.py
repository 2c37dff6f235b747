"""TSV-M, Iso-C and Iso-CTS: the specification's integer test vectors, the algebraic
invariants each method guarantees, the guard against arbitrary singular vectors of zero or
low-rank task matrices, and whole merges through the CLI."""

import pytest
import torch
from click.testing import CliRunner

import tiny_models
from conftest import write_project
from mixcli.cli import cli
from mixcli.errors import MixcliError
from mixcli.svd import rank_per_task
from mixcli_merge.iso_c import iso_c
from mixcli_merge.iso_cts import iso_cts, iso_cts_delta, subspace_sizes
from mixcli_merge.tsv_merge import tsv_delta, tsv_merge

TASKS = (2, 3, 4, 8, 14, 20)


def test_rank_per_task_is_fusionbenchs_double_precision_rule():
    assert [rank_per_task(768, t) for t in TASKS] == [384, 256, 192, 96, 54, 38]
    assert [rank_per_task(1024, t) for t in TASKS] == [512, 341, 256, 128, 73, 51]
    assert [rank_per_task(50, t) for t in TASKS] == [25, 16, 12, 6, 3, 2]
    assert rank_per_task(49, 49) == 0  # not 49 // 49


def test_iso_cts_subspace_sizes_are_the_specs_vectors():
    assert [subspace_sizes(768, t, 0.8) for t in TASKS] == [(614, 77), (615, 51), (616, 38), (616, 19),
                                                            (614, 11), (608, 8)]
    assert subspace_sizes(1024, 8, 0.8) == (816, 26)
    assert subspace_sizes(50, 4, 0.8) == (42, 2)  # round half to even; half up would give (38, 3)
    assert subspace_sizes(768, 3, 1.0) == (768, 0)


def family(t=3, shape=(40, 30), seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g, dtype=dtype)
    return base, [base + 0.1 * torch.randn(shape, generator=g, dtype=dtype) for _ in range(t)]


def singular_values(matrix):
    return torch.linalg.svdvals(matrix)


def test_tsv_with_one_task_is_scaled_task_arithmetic():
    base, (x,) = family(1)
    out = tsv_merge([x], base, alpha=0.7, weight=[2.0])
    torch.testing.assert_close(out, base + 0.7 * 2.0 * (x - base), rtol=0, atol=1e-12)


def test_tsv_keeps_each_tasks_spectrum_on_orthogonal_bases():
    base, xs = family(3)
    taus = [x - base for x in xs]
    delta = tsv_merge(xs, base) - base
    k = rank_per_task(30, 3)
    expected = torch.cat([singular_values(tau)[:k] for tau in taus]).sort(descending=True).values
    # U⊥ and V⊥ orthonormal: Δ's singular values are exactly the kept ones
    torch.testing.assert_close(singular_values(delta)[: 3 * k], expected, rtol=1e-10, atol=1e-12)


def test_iso_c_flattens_the_spectrum_of_the_sum():
    base, xs = family(3)
    total = sum(x - base for x in xs)
    delta = iso_c(xs, base, scaling_factor=1.0) - base
    mean = singular_values(total).mean()
    torch.testing.assert_close(singular_values(delta), mean.expand(30), rtol=1e-10, atol=0)
    u, _, vh = torch.linalg.svd(total, full_matrices=False)
    torch.testing.assert_close(delta, mean * (u @ vh), rtol=1e-10, atol=1e-12)
    # positive homogeneity, and the scaling factor scales Δ
    torch.testing.assert_close(iso_c(xs, base, scaling_factor=1.5) - base, 1.5 * delta, rtol=1e-10, atol=1e-12)


def test_iso_cts_with_the_whole_rank_common_is_iso_c():
    base, xs = family(3)
    torch.testing.assert_close(iso_cts(xs, base, common_space_fraction=1.0), iso_c(xs, base),
                               rtol=1e-10, atol=1e-12)


def test_iso_cts_has_a_flat_spectrum_on_orthogonal_bases():
    base, xs = family(3)
    delta = iso_cts(xs, base) - base
    values = singular_values(delta)
    torch.testing.assert_close(values, values.mean().expand(30), rtol=1e-9, atol=0)


def test_a_zero_task_vector_adds_no_direction():
    base, xs = family(3)
    frozen = xs[:2] + [base.clone()]  # the third model left this matrix unchanged
    taus = [x - base for x in xs[:2]]
    k = rank_per_task(30, 3)  # it still counts in T, as in FusionBench
    torch.testing.assert_close(tsv_merge(frozen, base) - base, tsv_delta(list(taus), k), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(iso_c(frozen, base), iso_c(xs[:2], base), rtol=1e-10, atol=1e-12)
    c, d = subspace_sizes(30, 3, 0.8)
    torch.testing.assert_close(iso_cts(frozen, base) - base, iso_cts_delta([t.clone() for t in taus], c, d), rtol=1e-10, atol=1e-12)


def test_low_rank_task_vectors_keep_the_merge_in_their_subspace():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(64, 48, dtype=torch.float64, generator=g)
    # LoRA-like fine-tunes: rank-2 task vectors
    xs = [base + torch.randn(64, 2, dtype=torch.float64, generator=g) @ torch.randn(2, 48, dtype=torch.float64,
                                                                                  generator=g)
          for _ in range(3)]
    total = sum(x - base for x in xs)
    u, s, _ = torch.linalg.svd(total, full_matrices=False)
    span = u[:, : int((s > s[0] * 1e-10).sum())]  # the column space of the sum (rank 6)
    for method in (tsv_merge, iso_c, iso_cts):
        delta = method(xs, base) - base
        outside = delta - span @ (span.T @ delta)
        assert outside.norm() <= 1e-9 * delta.norm(), method.__name__


def test_bfloat16_inputs_are_decomposed_in_float32():
    base, xs = family(3, dtype=torch.float32)
    low = [t.to(torch.bfloat16) for t in [base] + xs]
    out = iso_c(low[1:], low[0])
    assert out.dtype == torch.float32
    reference = iso_c([t.float() for t in low[1:]], low[0].float())
    torch.testing.assert_close(out, reference, rtol=0, atol=0)


def test_other_tensors_take_the_mean_task_vector():
    base, xs = family(3, shape=(30,))
    mean = sum(x - base for x in xs) / 3
    torch.testing.assert_close(tsv_merge(xs, base, alpha=2.0), base + 2.0 * mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(iso_cts(xs, base, scaling_factor=0.5), base + 0.5 * mean, rtol=1e-12, atol=1e-12)
    matrix_base, matrix_xs = family(3)
    excluded = iso_c(matrix_xs, matrix_base, exclude_keys=["w"], name="w")
    torch.testing.assert_close(excluded, matrix_base + sum(x - matrix_base for x in matrix_xs) / 3,
                               rtol=1e-12, atol=1e-12)


def test_a_common_subspace_that_cannot_fit_is_an_error():
    base, xs = family(2, shape=(3, 5))
    with pytest.raises(MixcliError, match="leaves a common subspace of -1 for 2 tasks of rank 3"):
        iso_cts(xs, base, common_space_fraction=0.0)


@pytest.mark.parametrize("method, params", [
    ("tsv_merge", "alpha = 1.0"),
    ("iso_c", "scaling_factor = 1.5"),
    ("iso_cts", "scaling_factor = 1.5\ncommon_space_fraction = 0.8"),
])
def test_whole_merges_equal_the_pure_function_and_load(method, params, tmp_path, llama_family):
    excluded = ["model.embed_tokens.weight", "lm_head.weight"]
    project = write_project(tmp_path, f"""
[models]
base = "{llama_family['base']}"
ft1 = "{llama_family['ft1']}"
ft2 = "{llama_family['ft2']}"
ft3 = "{llama_family['ft3']}"
[method]
name = "{method}"
base = "base"
{params}
exclude_keys = {excluded!r}
[output]
path = "out"
""".replace("'", '"'))
    result = CliRunner().invoke(cli, ["merge", str(project)])
    assert result.exit_code == 0, result.output
    merged = tiny_models.load_tensors(tmp_path / "out")
    inputs = {m: tiny_models.load_tensors(llama_family[m]) for m in ("base", "ft1", "ft2", "ft3")}
    function = {"tsv_merge": tsv_merge, "iso_c": iso_c, "iso_cts": iso_cts}[method]
    kwargs = dict(line.split(" = ") for line in params.splitlines())
    kwargs = {k: float(v) for k, v in kwargs.items()}
    for name, tensor in merged.items():
        expected = function([inputs[m][name] for m in ("ft1", "ft2", "ft3")], inputs["base"][name],
                            exclude_keys=excluded, name=name, **kwargs)
        # the engine decomposes on one thread, this test on all: LAPACK rounds differently
        torch.testing.assert_close(tensor, expected.to(tensor.dtype), rtol=1e-4, atol=1e-5)
    delta = merged["model.embed_tokens.weight"] - inputs["base"]["model.embed_tokens.weight"]
    mean = sum(inputs[m]["model.embed_tokens.weight"] for m in ("ft1", "ft2", "ft3")) / 3 \
        - inputs["base"]["model.embed_tokens.weight"]
    scale = kwargs.get("alpha", kwargs.get("scaling_factor"))
    torch.testing.assert_close(delta, scale * mean, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(tiny_models.logits(tmp_path / "out")).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_the_mean_path_runs_in_chunks_with_the_bits_of_the_whole_tensor_arithmetic(dtype):
    # tensors the SVD rule does not take (embeddings, norms, excluded names) merge by the mean
    # task vector; it is computed a chunk at a time, so an embedding's float32 task vectors are
    # never held whole, and every element must still be the whole-tensor formula's
    from mixcli.svd import working
    from mixcli_merge import iso_c, iso_cts, tsv_merge

    g = torch.Generator().manual_seed(4)
    shape = (700, 1000)  # more elements than one chunk
    base = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    xs = [(base.double() + 0.01 * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype) for _ in range(3)]
    weights = [0.5, 1.0, 0.25]
    w0 = working(base)

    def whole(coefficient, weights=None):
        taus = [working(x) - w0 for x in xs]
        if weights is not None:
            taus = [t if w == 1.0 else t * w for t, w in zip(taus, weights)]
        total = torch.zeros_like(taus[0])
        for t in taus:
            total += t
        return w0 + (total / len(taus)) * coefficient

    got = tsv_merge.tsv_merge(xs, base, alpha=0.7, weight=weights, decompose=False, name="e")
    assert got.dtype == w0.dtype and torch.equal(got, whole(0.7, weights))
    assert torch.equal(iso_c.iso_c(xs, base, scaling_factor=1.3, exclude_keys=("e",), name="e"), whole(1.3))
    assert torch.equal(iso_cts.iso_cts(xs, base, scaling_factor=1.0, decompose=False), whole(1.0))
    vector = tsv_merge.tsv_merge([x[0] for x in xs], base[0], alpha=1.0, name="norm")  # 1-D: always the mean
    assert torch.equal(vector, (w0[0] + sum((working(x[0]) - w0[0] for x in xs), torch.zeros_like(w0[0])) / 3))


@pytest.mark.parametrize("method", ["tsv_merge", "iso_c", "iso_cts"])
def test_computed_into_the_output_file_the_merge_has_the_bits_of_the_function(method, tmp_path, llama_family):
    # the engine hands these methods the output file's memory (accepts_out): every tensor,
    # through the SVD rule or the mean, must equal the function's result rounded once
    from click.testing import CliRunner

    import tiny_models
    from mixcli.cli import cli
    from mixcli.plugins import get_registry

    project = tmp_path / "project.toml"
    project.write_text(f'[models]\nbase = "{llama_family["base"]}"\nft1 = "{llama_family["ft1"]}"\n'
                       f'ft2 = "{llama_family["ft2"]}"\n[method]\nname = "{method}"\nbase = "base"\n'
                       'dtype = "bfloat16"\n'
                       'decompose = [{ filter = "layers.0.", value = true }, { value = false }]\n'
                       '[output]\npath = "out"\n')
    result = CliRunner().invoke(cli, ["merge", str(project), "--no-progress"])
    assert result.exit_code == 0, result.output
    written = tiny_models.load_tensors(tmp_path / "out")
    inputs = {n: tiny_models.load_tensors(llama_family[n]) for n in ("base", "ft1", "ft2")}
    merge = get_registry().methods[method].merge
    assert written and any("layers.0." in n for n in written)
    threads = torch.get_num_threads()
    for name, tensor in written.items():
        base = inputs["base"][name].bfloat16()
        xs = [inputs[m][name].bfloat16() for m in ("ft1", "ft2")]
        wants = []
        for count in {1, threads}:  # the engine runs small tensors on one thread, or all on one worker
            torch.set_num_threads(count)
            try:
                wants.append(merge(xs, base, decompose="layers.0." in name and base.dim() == 2, name=name).bfloat16())
            finally:
                torch.set_num_threads(threads)
        assert tensor.dtype == torch.bfloat16 and any(torch.equal(tensor, want) for want in wants), name


THREADS_SEEN: list = []


def threads_recording_copy(tensors, base, out=None):
    THREADS_SEEN.append((tuple(base.shape), torch.get_num_threads(), out is not None))
    result = tensors[0].clone()
    return result if out is None else out.copy_(result)


@pytest.mark.parametrize("into_the_file", [True, False])
def test_the_engine_gives_a_large_matrix_of_a_linear_algebra_method_all_cores(into_the_file, tmp_path):
    # the method record's linear_algebra: a matrix of at least INTRA_OP_MIN_SIDE on both sides
    # runs alone on every core, whether computed into the output file (accepts_out) or not;
    # smaller tensors run one per worker on one thread
    import os

    import mixcli
    from safetensors.torch import save_file

    from mixcli import plugins
    from mixcli.tensorwise import INTRA_OP_MIN_SIDE

    class LinearAlgebraPlugin:
        @mixcli.hookimpl
        def register_merge_methods(register):
            register(mixcli.MergeMethod(name="threads_seen", summary="copy, noting torch's threads",
                                        merge=threads_recording_copy, accepts_out=into_the_file,
                                        linear_algebra=True))

    side = INTRA_OP_MIN_SIDE
    for name in ("base", "ft"):
        (tmp_path / name).mkdir()
        save_file({"large.weight": torch.zeros(side, side, dtype=torch.bfloat16),
                   "tall.weight": torch.zeros(4 * side, 8, dtype=torch.bfloat16),
                   "small.weight": torch.zeros(8, 8, dtype=torch.bfloat16)}, tmp_path / name / "model.safetensors")
        (tmp_path / name / "config.json").write_text("{}")
    project = write_project(tmp_path, f'[models]\nbase = "{tmp_path / "base"}"\nft = "{tmp_path / "ft"}"\n'
                                      '[method]\nname = "threads_seen"\nbase = "base"\n[output]\npath = "out"\n'
                                      'copy_tokenizer = false\n')
    plugins.reset()
    plugins.load_plugins()
    plugins.pm.register(LinearAlgebraPlugin, name="threads-seen")
    THREADS_SEEN.clear()
    try:
        result = CliRunner().invoke(cli, ["merge", str(project), "--no-progress", "--workers", "2"])
    finally:
        plugins.reset()
    assert result.exit_code == 0, result.output
    seen = {shape: (threads, out) for shape, threads, out in THREADS_SEEN}
    assert seen[(side, side)] == (os.cpu_count(), into_the_file)
    assert seen[(4 * side, 8)] == (1, into_the_file) and seen[(8, 8)] == (1, into_the_file)


def test_torch_threads_wait_passively_unless_the_user_says_otherwise():
    # read by torch's OpenMP when torch loads, so mixcli sets it on import, before torch
    import os
    import subprocess
    import sys

    code = "import mixcli, os; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip() == "PASSIVE"
    assert subprocess.run([sys.executable, "-c", code], env=dict(env, OMP_WAIT_POLICY="ACTIVE"),
                          capture_output=True, text=True, check=True).stdout.strip() == "ACTIVE"


def plain_orthogonalised(blocks, like, flat):
    from mixcli.svd import polar

    values = torch.cat([s for _, s, _ in blocks])
    u = polar(torch.cat([u for u, _, _ in blocks], dim=1))
    vh = polar(torch.cat([vh for _, _, vh in blocks], dim=0))
    return values.mean() * (u @ vh) if flat else (u * values) @ vh


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_merges_that_let_each_matrix_go_once_used_have_the_bits_of_the_plain_formulas(dtype):
    # TSV-M, Iso-C and Iso-CTS drop each task vector once decomposed, overwrite it by its
    # residual, and stack the factors before the polar SVDs: the same operations in the same
    # order as the plain formulas below (every matrix held to the end), so the same bits
    from mixcli.svd import kept, thin_svd, truncated_svd
    from mixcli_merge._singular import finish, task_vectors
    from mixcli_merge.iso_c import iso_c_delta

    g = torch.Generator().manual_seed(7)
    base = torch.randn(120, 70, generator=g).to(dtype)
    xs = [(base.float() + 0.05 * torch.randn(120, 70, generator=g)).to(dtype) for _ in range(3)]
    taus = task_vectors(xs, base)
    k = rank_per_task(70, 3)
    plain_tsv = plain_orthogonalised([kept(*truncated_svd(t, k)) for t in taus], taus[0], flat=False)
    assert torch.equal(tsv_merge(xs, base, alpha=0.7), finish(base, plain_tsv, 0.7))
    total = taus[0].clone()
    for tau in taus[1:]:
        total += tau
    assert torch.equal(iso_c(xs, base, scaling_factor=1.5), finish(base, iso_c_delta(total), 1.5))
    c, d = subspace_sizes(70, 3, 0.8)
    u, s, vh = thin_svd(total)
    u_c = u[:, :c]
    blocks = [kept(*truncated_svd(t - u_c @ (u_c.T @ t), d, float(s[0]))) for t in taus]
    plain_cts = plain_orthogonalised(blocks + [kept(u_c, s[:c], vh[:c])], total, flat=True)
    assert torch.equal(iso_cts(xs, base, scaling_factor=1.5), finish(base, plain_cts, 1.5))


def decaying_family(t, shape, slope, seed=0):
    """A float32 base and ``t`` models whose task vectors have singular values ``j^-slope`` on
    random orthonormal bases, seeded. Fine-tuned task vectors decay: the quick zoo's experts'
    fall as j^-1.1 to j^-1.7 over their top half (every 2-D tensor of its language and vision
    families), so slope 1 is the slower, harder end; slope 0 (a flat spectrum) is noise."""
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    r = min(m, n)
    base = torch.randn(shape, generator=g, dtype=torch.float64)
    values = torch.arange(1, r + 1, dtype=torch.float64) ** -slope
    models = []
    for _ in range(t):
        u = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64)).Q
        v = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64)).Q
        models.append((base + 0.01 * (u * values) @ v.T).float())
    return base.float(), models


def relative_error(got, want, base):
    return float((got.double() - want.double()).norm() / (want.double() - base.double()).norm())


@pytest.mark.parametrize("tasks, shape", [(8, (192, 128)), (12, (192, 128)), (8, (96, 160))])
def test_the_randomized_svd_keeps_tsv_within_its_tolerance_on_decaying_spectra(tasks, shape):
    # the stated tolerance: the merged task vector within 1e-2 (relative Frobenius) of the
    # full-SVD merge, on spectra decaying at least as j^-1
    base, xs = decaying_family(tasks, shape, slope=1.0)
    full = tsv_merge(xs, base)
    randomized = tsv_merge(xs, base, svd_solver="randomized")
    assert 0 < relative_error(randomized, full, base) <= 1e-2


def test_the_randomized_svd_does_not_hold_on_a_flat_spectrum():
    # noise has no top directions to find: the documented limit of the option
    base, xs = decaying_family(8, (192, 128), slope=0.0)
    assert relative_error(tsv_merge(xs, base, svd_solver="randomized"), tsv_merge(xs, base), base) > 0.1


@pytest.mark.parametrize("tasks", [2, 4, 7])
def test_the_randomized_svd_is_the_full_one_where_it_would_not_pay(tasks):
    # below T = 8 the sketch (2k columns) is more than a quarter of the rank and the range
    # finder costs more than the full SVD: it is the full SVD, bit for bit (and buys nothing)
    base, xs = decaying_family(tasks, (192, 128), slope=1.0)
    assert torch.equal(tsv_merge(xs, base, svd_solver="randomized"), tsv_merge(xs, base))


def test_the_randomized_svd_adds_no_direction_for_a_zero_task_vector():
    base, xs = family(8, shape=(120, 96))
    frozen = xs[:7] + [base.clone()]
    k = rank_per_task(96, 8)  # 12: a sketch of 24 = 96 / 4 columns, so the range finder runs
    taus = [x - base for x in xs[:7]]
    torch.testing.assert_close(tsv_merge(frozen, base, svd_solver="randomized") - base,
                               tsv_delta(taus, k, "randomized"), rtol=1e-10, atol=1e-12)


def test_svd_solver_randomized_through_the_cli(tmp_path, llama_family):
    project = write_project(tmp_path, f"""
[models]
base = "{llama_family['base']}"
ft1 = "{llama_family['ft1']}"
ft2 = "{llama_family['ft2']}"
ft3 = "{llama_family['ft3']}"
[method]
name = "tsv_merge"
base = "base"
svd_solver = "randomized"
exclude_keys = ["model.embed_tokens.weight", "lm_head.weight"]
[output]
path = "out"
""")
    result = CliRunner().invoke(cli, ["merge", str(project), "--no-progress"])
    assert result.exit_code == 0, result.output
    merged = tiny_models.load_tensors(tmp_path / "out")
    inputs = {m: tiny_models.load_tensors(llama_family[m]) for m in ("base", "ft1", "ft2", "ft3")}
    name = "model.layers.0.mlp.up_proj.weight"  # T = 3: the full SVD (the tests above: where it runs)
    expected = tsv_merge([inputs[m][name] for m in ("ft1", "ft2", "ft3")], inputs["base"][name],
                         svd_solver="randomized")
    torch.testing.assert_close(merged[name], expected, rtol=1e-4, atol=1e-5)
    bad = write_project(tmp_path, project.read_text().replace('"randomized"', '"lanczos"'), "bad.toml")
    result = CliRunner().invoke(cli, ["merge", str(bad), "--no-progress"])
    assert result.exit_code == 1 and "svd_solver" in result.output and "randomized" in result.output
