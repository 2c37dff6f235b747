"""Where tensor-wise methods compute: --device / [output] device. The CPU result is the
reference; a CUDA device, when one is visible, must match it within the dtype's tolerance."""

import pytest
import torch

import tiny_models
from conftest import write_project
from test_merge_end_to_end import METHODS, merge
from test_project_errors import assert_one_line_error, run

CHECKED = ("linear", "ties", "dare_ties", "della", "slerp")


def project(folder, family, method, device_line=""):
    base_line, params = METHODS.get(method, ('base = "base"', "t = 0.3"))
    models = f'base = "{family["base"]}"\nft1 = "{family["ft1"]}"'
    if method != "slerp":
        models += f'\nft2 = "{family["ft2"]}"'
    folder.mkdir(parents=True, exist_ok=True)
    return write_project(folder, f"""
[models]
{models}
[method]
name = "{method}"
{base_line}
{params}
[output]
path = "out"
{device_line}
""")


@pytest.mark.parametrize("method", CHECKED)
def test_an_explicit_cpu_device_writes_the_same_bytes(tmp_path, llama_family, method):
    merge(project(tmp_path / "default", llama_family, method))
    merge(project(tmp_path / "option", llama_family, method), "--device", "cpu")
    merge(project(tmp_path / "table", llama_family, method, 'device = "cpu"'))
    reference = (tmp_path / "default" / "out" / "model.safetensors").read_bytes()
    for where in ("option", "table"):
        assert (tmp_path / where / "out" / "model.safetensors").read_bytes() == reference, where


def test_device_names_are_checked(tmp_path, llama_family):
    assert_one_line_error(run("merge", project(tmp_path, llama_family, "linear", 'device = "gpu"')),
                          "project.toml: [output] device must be \"cpu\", \"cuda\" or \"cuda:N\", got 'gpu'")
    assert_one_line_error(run("merge", project(tmp_path, llama_family, "linear", "device = 0")),
                          "[output] device must be", "got 0")
    assert_one_line_error(run("merge", project(tmp_path, llama_family, "linear"), "--device", "cuda:x"),
                          "--device must be \"cpu\", \"cuda\" or \"cuda:N\", got 'cuda:x'")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", CHECKED)
def test_cuda_matches_the_cpu_or_is_a_one_line_error_without_a_gpu(tmp_path, llama_family, method):
    if not torch.cuda.is_available():
        for args, where in ((["--device", "cuda"], "--device: device 'cuda'"),
                            (["--device", "cuda", "--dry-run"], "--device: device 'cuda'")):
            assert_one_line_error(run("merge", project(tmp_path, llama_family, method), *args), where,
                                  "finds no CUDA device", "use \"cpu\"")
        assert_one_line_error(run("merge", project(tmp_path, llama_family, method, 'device = "cuda"')),
                              "project.toml: [output] device: device 'cuda' asked")
        assert not (tmp_path / "out").exists()
        return
    merge(project(tmp_path / "cpu", llama_family, method))
    merge(project(tmp_path / "cuda", llama_family, method, 'device = "cuda"'))
    cpu = tiny_models.load_tensors(tmp_path / "cpu" / "out")
    cuda = tiny_models.load_tensors(tmp_path / "cuda" / "out")
    assert cpu.keys() == cuda.keys()
    for name in cpu:
        assert torch.allclose(cuda[name], cpu[name], rtol=1e-5, atol=1e-6), name
