import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import mixcli  # noqa: E402, F401  (before torch: it sets torch's OpenMP wait policy)
import tiny_models  # noqa: E402


@pytest.fixture(scope="session")
def llama_family(tmp_path_factory):
    return tiny_models.build_family(tmp_path_factory.mktemp("llama"), "llama", experts=3)


@pytest.fixture(scope="session")
def llama_bf16_family(tmp_path_factory):
    import torch

    return tiny_models.build_family(tmp_path_factory.mktemp("llama_bf16"), "llama", experts=2,
                                    dtype=torch.bfloat16, seed=3)


@pytest.fixture(scope="session")
def mistral_family(tmp_path_factory):
    return tiny_models.build_family(tmp_path_factory.mktemp("mistral"), "mistral", experts=2, seed=1)


@pytest.fixture(scope="session")
def tied_family(tmp_path_factory):
    return tiny_models.build_family(tmp_path_factory.mktemp("tied"), "llama", experts=2, seed=2, tie=True)


@pytest.fixture(scope="session")
def qwen2_tied_family(tmp_path_factory):
    """Qwen2: q/k/v biases, GQA, tied embeddings."""
    return tiny_models.build_family(tmp_path_factory.mktemp("qwen2_tied"), "qwen2", experts=1, seed=4, tie=True)


@pytest.fixture(scope="session")
def qwen2_sharded_family(tmp_path_factory):
    """Qwen2 with a separate lm_head, each model saved in several shards."""
    return tiny_models.build_family(tmp_path_factory.mktemp("qwen2_sharded"), "qwen2", experts=1, seed=5,
                                    shard_size="200KB")


def write_project(folder: Path, text: str, name: str = "project.toml") -> Path:
    path = Path(folder) / name
    path.write_text(text)
    return path


def evolve_toy_folder(tmp_path_factory, family, plugin, name: str, share: float) -> Path:
    """For the evolve tests' toy problems: the plugins reset with ``plugin`` registered, and a
    fresh folder holding ``target/``, ``share`` of ft1 plus the rest of ft2."""
    from safetensors.torch import save_file

    from mixcli import plugins

    plugins.reset()
    plugins.load_plugins()
    plugins.pm.register(plugin, name=name)
    folder = tmp_path_factory.mktemp(name)
    a, b = tiny_models.load_tensors(family["ft1"]), tiny_models.load_tensors(family["ft2"])
    (folder / "target").mkdir()
    save_file({k: share * a[k] + (1 - share) * b[k] for k in a}, folder / "target" / "model.safetensors")
    return folder
