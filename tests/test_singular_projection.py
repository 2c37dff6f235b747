"""Singular projection merging: the method notes' invariants on random matrices, and a whole
merge of a tiny Llama whose non-Linear tensors are the fine-tune's."""

import pytest
import torch
from click.testing import CliRunner

import tiny_models
from conftest import write_project
from mixcli.cli import cli
from mixcli_smile.singular_projection_merging import half_energy_rank, singular_projection_merging as spm


def pair(shape=(24, 24), seed=0):
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(shape, generator=g, dtype=torch.float64)
    return w0, w0 + 0.1 * torch.randn(shape, generator=g, dtype=torch.float64)


def test_high_zone_from_zero_with_full_matrices_is_the_fine_tune():
    w0, w1 = pair((30, 20))
    torch.testing.assert_close(spm([w1], w0, k=0, rank="high", full_matrices=True, name="a.weight"), w1,
                               rtol=0, atol=1e-12)


def test_low_zone_of_size_zero_is_the_pretrained_weight():
    w0, w1 = pair((30, 20))
    torch.testing.assert_close(spm([w1], w0, k=0, rank="low", name="a.weight"), w0, rtol=0, atol=0)


def test_the_whole_low_zone_of_a_square_full_rank_weight_is_the_fine_tune():
    w0, w1 = pair((24, 24))
    torch.testing.assert_close(spm([w1], w0, k=24, rank="low", name="a.weight"), w1, rtol=0, atol=1e-12)


def test_projection_is_onto_the_chosen_subspaces():
    w0, w1 = pair((30, 20))
    u, _, vh = torch.linalg.svd(w0, full_matrices=False)
    k = 5
    out = spm([w1], w0, k=k, rank="low", name="a.weight") - w0
    expected = u[:, :k] @ u[:, :k].T @ (w1 - w0) @ vh[:k].T @ vh[:k]
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    low, high = out, spm([w1], w0, k=k, rank="high", name="a.weight") - w0
    assert abs(float((low * high).sum())) < 1e-10  # the two zones are orthogonal


def test_a_negative_k_takes_the_half_energy_rank():
    sigma = torch.tensor([4.0, 3.0, 2.0, 1.0])  # cumulative 4, 7, 9, 10: half is 5 -> 2 components
    assert half_energy_rank(sigma) == 2
    w0, w1 = pair((16, 12))
    k = half_energy_rank(torch.linalg.svdvals(w0))
    torch.testing.assert_close(spm([w1], w0, k=-1, name="a.weight"), spm([w1], w0, k=k, name="a.weight"),
                               rtol=0, atol=0)


@pytest.mark.parametrize("name, shape", [("model.embed_tokens.weight", (50, 8)), ("a.bias", (8,)),
                                         ("norm.weight", (8,))])
def test_embeddings_biases_and_norms_are_the_fine_tunes(name, shape):
    w0, w1 = pair(shape)
    assert torch.equal(spm([w1], w0, k=2, name=name), w1)


def test_a_whole_merge_keeps_the_fine_tunes_other_tensors(tmp_path, llama_family):
    project = write_project(tmp_path, f"""
[models]
base = "{llama_family['base']}"
ft1 = "{llama_family['ft1']}"
[method]
name = "singular_projection_merging"
base = "base"
k = 8
[output]
path = "out"
""")
    result = CliRunner().invoke(cli, ["merge", str(project)])
    assert result.exit_code == 0, result.output
    merged = tiny_models.load_tensors(tmp_path / "out")
    base, ft = tiny_models.load_tensors(llama_family["base"]), tiny_models.load_tensors(llama_family["ft1"])
    for name, tensor in merged.items():
        if tensor.dim() == 2 and "embed_tokens" not in name:
            expected = spm([ft[name]], base[name], k=8, name=name)
            torch.testing.assert_close(tensor, expected.to(tensor.dtype), rtol=1e-4, atol=1e-5)
        else:
            assert torch.equal(tensor, ft[name]), name
    assert torch.isfinite(tiny_models.logits(tmp_path / "out")).all()


def test_two_fine_tunes_are_refused(tmp_path, llama_family):
    project = write_project(tmp_path, f"""
[models]
base = "{llama_family['base']}"
ft1 = "{llama_family['ft1']}"
ft2 = "{llama_family['ft2']}"
[method]
name = "singular_projection_merging"
base = "base"
[output]
path = "out"
""")
    result = CliRunner().invoke(cli, ["merge", str(project)])
    assert result.exit_code == 1
    assert "method 'singular_projection_merging' takes exactly 1 model(s) besides the base, got 2" in result.output
