"""`mixcli validate` and `mixcli merge --dry-run` read configs and safetensors headers only,
for every registered upscaler and a tensor-wise merge: the operating system reports every
open of the weight files (inotify), whoever opens them (Python, or transformers' and
safetensors' native code), and each may be opened once, to read its header."""

import ctypes
import json
import os
import struct
from collections import Counter
from pathlib import Path

import pytest
import torch
import transformers
from click.testing import CliRunner
from safetensors.torch import save_file

from conftest import write_project
from mixcli.cli import cli
from mixcli.plugins import get_registry

IN_OPEN = 0x20


class OpenWatch:
    """Counts the opens of the given files, by anyone, through Linux inotify."""

    def __init__(self, paths):
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        assert self.fd >= 0, os.strerror(ctypes.get_errno())
        self.files = {}
        for path in paths:
            wd = libc.inotify_add_watch(self.fd, str(path).encode(), IN_OPEN)
            assert wd >= 0, os.strerror(ctypes.get_errno())
            self.files[wd] = Path(path)

    def opens(self) -> Counter:
        counts = Counter()
        while True:
            try:
                data = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                break
            offset = 0
            while offset < len(data):
                wd, mask, _, length = struct.unpack_from("iIII", data, offset)
                if mask & IN_OPEN:
                    counts[self.files[wd]] += 1
                offset += 16 + length
        return counts

    def close(self):
        os.close(self.fd)


def vit_config():
    return transformers.ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=32)


@pytest.fixture(scope="module")
def vit_family(tmp_path_factory):
    """A ViT base and two perturbed experts, each a task folder (head, task.json, data)."""
    root = tmp_path_factory.mktemp("vit_reads")
    torch.manual_seed(0)
    base = transformers.ViTModel(vit_config()).eval()
    base.save_pretrained(root / "base")
    gen = torch.Generator().manual_seed(1)
    for t in range(2):
        expert = transformers.ViTModel(vit_config()).eval()
        expert.load_state_dict({k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in base.state_dict().items()})
        folder = root / f"t{t}"
        expert.save_pretrained(folder)
        save_file({"weight": torch.randn(3, 16, generator=gen), "bias": torch.zeros(3)}, str(folder / "head.safetensors"))
        data = {"pixel_values": torch.randn(8, 1, 8, 8, generator=gen), "labels": torch.randint(0, 3, (8,), generator=gen)}
        save_file(data, str(folder / "train.safetensors"))
        save_file(data, str(folder / "test.safetensors"))
        (folder / "task.json").write_text(json.dumps({"data": {"train": "train.safetensors", "test": "test.safetensors"}}))
    return root


def llama_models(family, names):
    models = {"base": family["base"], **{n: family[n] for n in names}}
    return "\n".join(f'{name} = {{ path = "{path}", positive_prompts = ["{name} 12+3="] }}'
                     for name, path in models.items())


def projects(llama, vit):
    """(name, project text) for every registered upscaler and a tensor-wise merge."""
    moe = llama_models(llama, ["ft1", "ft2"])
    vits = "\n".join(f'{n} = "{vit / n}"' for n in ("base", "t0", "t1"))
    out = {}
    out["moe_upcycle"] = f'[models]\nm = "{llama["base"]}"\n[method]\nname = "moe_upcycle"\nnum_experts = 2\n'
    for mode in ("hidden", "hidden_avg", "hidden_last", "cheap_embed", "random", "uniform_random"):
        out[f"moe_merge-{mode}"] = (f'[models]\n{moe}\n[method]\nname = "moe_merge"\nbase = "base"\n'
                                    f'experts = ["ft1", "ft2"]\ngate_mode = "{mode}"\nhidden_dtype = "float32"\n'
                                    'modules = ["mlp", "q_proj"]\nstem = "dare_ties"\n'
                                    'stem_params = { density = 0.5 }\n')
    for method in ("we_moe", "sparse_we_moe", "rank_one_moe", "pwe_moe"):
        out[method] = (f'[models]\n{vits}\n[method]\nname = "{method}"\nbase = "base"\n'
                       '[adapt]\nmax_steps = 1\nbatch_size = 2\n')
    out["smile_upscaling"] = f'[models]\n{vits}\n[method]\nname = "smile_upscaling"\nbase = "base"\nk = 4\n'
    base, ft1, ft2 = llama["base"], llama["ft1"], llama["ft2"]
    out["depth_upscaling"] = f'[models]\nm = "{base}"\n[method]\nname = "depth_upscaling"\nlayers = ["0:3", "1:4"]\n'
    out["frankenmerge"] = (f'[models]\na = "{ft1}"\nb = "{ft2}"\n[method]\nname = "frankenmerge"\n'
                           'layers = [{ model = "a", range = [0, 2] }, { model = "b", range = [2, 4] }]\n')
    out["layer_path"] = (f'[models]\na = "{ft1}"\nb = "{ft2}"\n[method]\nname = "layer_path"\n'
                         'layers = [{ model = "a", layer = 0 }, { model = "b", layer = 2, scale = 0.8 }]\n')
    out["model_recombination"] = (f'[models]\nbase = "{base}"\nft1 = "{ft1}"\nft2 = "{ft2}"\n[method]\n'
                                  'name = "model_recombination"\n')
    out["dare_ties"] = (f'[models]\nbase = "{base}"\nft1 = "{ft1}"\nft2 = "{ft2}"\n[method]\nname = "dare_ties"\n'
                        'base = "base"\ndensity = 0.5\nweight = 0.5\n')
    return {name: text + '[output]\npath = "out"\n' for name, text in out.items()}


def test_covers_every_registered_upscaler(llama_family, vit_family):
    from mixcli.components import Upscaler

    upscalers = {name for name, m in get_registry().methods.items() if isinstance(m, Upscaler)}
    covered = {name.split("-")[0] for name in projects(llama_family, vit_family)}
    assert upscalers <= covered, sorted(upscalers - covered)


@pytest.mark.parametrize("command", [["validate"], ["merge", "--dry-run"]])
def test_plan_opens_each_weight_file_once_for_its_header(llama_family, vit_family, tmp_path, command):
    weights = sorted(p for folder in [*llama_family.values(), *(vit_family / n for n in ("base", "t0", "t1"))]
                     for p in Path(folder).glob("*.safetensors"))
    data = sorted(p for n in ("t0", "t1") for p in (vit_family / n).glob("*.safetensors")
                  if not p.name.startswith("model"))
    failures = {}
    for name, text in projects(llama_family, vit_family).items():
        path = write_project(tmp_path, text, f"{name}.toml")
        watch = OpenWatch(weights + data)
        try:
            result = CliRunner().invoke(cli, [*command, str(path)])
            opens = watch.opens()
        finally:
            watch.close()
        assert result.exit_code == 0, (name, result.output)
        extra = {str(p): n for p, n in opens.items() if n > (1 if p in weights else 0)}
        if extra:
            failures[name] = extra
        assert not (tmp_path / "out").exists()
    assert not failures, json.dumps(failures)
