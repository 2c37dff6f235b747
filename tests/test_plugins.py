"""Entry-point discovery and every hook, through a real third-party plugin installed with pip."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tiny_models
from conftest import write_project

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A folder holding the example plugin (installed by pip) and a plugin that cannot import."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(ROOT / "examples" / "mixcli-example-plugin")],
                   check=True, capture_output=True)
    broken = target / "mixcli_broken_plugin-0.1.dist-info"
    broken.mkdir()
    (broken / "METADATA").write_text("Metadata-Version: 2.1\nName: mixcli-broken-plugin\nVersion: 0.1\n")
    (broken / "entry_points.txt").write_text("[mixcli]\nbroken = mixcli_broken_plugin\n")
    (target / "mixcli_broken_plugin.py").write_text("import a_module_that_does_not_exist\n")
    return target


def mixcli(site, *args, cwd=None, check=True):
    env = dict(os.environ, COLUMNS="200",
               PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-m", "mixcli", *map(str, args)], capture_output=True,
                            text=True, env=env, cwd=cwd)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def test_list_methods_shows_the_plugin_methods_with_their_package(site):
    rows = {row["name"]: row for row in json.loads(mixcli(site, "list-methods", "--json").stdout)}
    assert rows["example_scale"]["kind"] == "merge"
    assert rows["example_scale"]["package"] == "mixcli-example-plugin"
    assert rows["example_scale"]["version"] == "0.1.0"
    assert rows["example_scale"]["parameters"][0]["name"] == "factor"
    assert rows["example_scale"]["parameters"][0]["default"] == 1.0
    assert rows["example_repeat_layers"]["kind"] == "upscale"
    assert rows["example_tensor_count"]["kind"] == "evaluator"
    table = mixcli(site, "list-methods").stdout
    assert any(line.split()[:3] == ["example_scale", "merge", "mixcli-example-plugin"] for line in table.splitlines())
    details = mixcli(site, "list-methods", "example_scale").stdout
    assert details.startswith("example_scale (merge, mixcli-example-plugin 0.1.0): ")


def at_80_columns(site, *args):
    """Run mixcli on a pseudo-terminal 80 columns wide; its output."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    env["PYTHONPATH"] = os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])
    proc = subprocess.Popen([sys.executable, "-m", "mixcli", *args], stdout=slave, stderr=slave, env=env)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # the other end closed
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait() == 0
    os.close(master)
    import re

    return re.sub(r"\x1b\[[0-9;]*m", "", b"".join(chunks).decode()).replace("\r", "")


def test_list_methods_is_one_line_per_method_at_80_columns(site):
    rows = json.loads(mixcli(site, "list-methods", "--json").stdout)
    lines = [line for line in at_80_columns(site, "list-methods").splitlines()
             if line.strip() and not line.startswith("warning:")]  # the broken plugin's, on stderr
    assert max(len(line) for line in lines) <= 80
    assert lines[0].split() == ["name", "kind", "package", "summary"]
    body = [line for line in lines[1:] if not line.startswith("`")]
    assert [line.split()[:3] for line in body] == [[r["name"], r["kind"], r["package"]] for r in rows]
    slerp = next(line for line in body if line.startswith("slerp "))
    assert "Spherical interp" in slerp  # the summary, cut to fit


def test_list_methods_name_shows_each_parameter_with_default_range_and_meaning(site):
    text = mixcli(site, "list-methods", "slerp").stdout
    assert text.splitlines() == [
        "slerp (merge, mixcli-merge 0.1.0): Spherical interpolation between the base and one other model",
        "  t  float, required, [0.0, 1.0] unless extrapolate = true",
        "      interpolation factor: 0 = base model, 1 = the other model",
        "  extrapolate  bool, default false",
        "      allow t outside [0, 1], past either model (mergekit accepts any t without a word)",
    ]
    ties = mixcli(site, "list-methods", "ties").stdout
    assert "  density  float per model, default 1.0, [0.0, 1.0]" in ties.splitlines()
    assert json.loads(mixcli(site, "list-methods", "ties", "--json").stdout)["parameters"][1]["name"] == "density"
    assert max(len(line) for line in at_80_columns(site, "list-methods", "moe_merge").splitlines()
               if not line.startswith("warning:")) <= 80
    wrong = mixcli(site, "list-methods", "slrp", check=False)
    assert wrong.returncode == 1 and wrong.stderr.strip() == (
        "Error: unknown method or evaluator 'slrp' (did you mean 'slerp'?); `mixcli list-methods` shows them all")


def test_a_plugin_that_fails_to_import_is_a_warning_not_a_failure(site):
    listing = json.loads(mixcli(site, "plugins", "--json").stdout)
    broken = next(p for p in listing["plugins"] if p["package"] == "mixcli-broken-plugin")
    assert "ModuleNotFoundError" in broken["error"]
    assert any("mixcli-broken-plugin" in w and "failed to load" in w for w in listing["warnings"])
    example = next(p for p in listing["plugins"] if p["package"] == "mixcli-example-plugin")
    assert "loader:example_link" in example["provides"] and example["error"] is None
    assert "failed to load" in mixcli(site, "plugins").stdout


def test_project_section_and_search_strategy_hooks(site, tmp_path, llama_family):
    example = next(p for p in json.loads(mixcli(site, "plugins", "--json").stdout)["plugins"]
                   if p["package"] == "mixcli-example-plugin")
    assert {"section:example_notes", "strategy:example_random"} <= set(example["provides"])
    text = f"""
[models]
a = {{ path = "{llama_family['ft1']}", weight = 1.0 }}
b = {{ path = "{llama_family['ft2']}", weight = 1.0 }}
[method]
name = "linear"
[example_notes]
author = 3
"""
    project = write_project(tmp_path, text)
    result = mixcli(site, "validate", project, check=False)
    assert result.stderr.strip().splitlines() == ["Error: project.toml: [example_notes] author must be a "
                                                  "non-empty string"]
    write_project(tmp_path, text.replace("author = 3", 'author = "me"'))
    assert mixcli(site, "validate", project).stdout.startswith("ok ")
    search = text.replace("author = 3", 'author = "me"') + """
[output]
path = "out"
[search]
budget = 1
strategy = "example_random"
[[search.fitness]]
evaluator = "example_tensor_count"
metric = "elements"
"""
    assert mixcli(site, "validate", write_project(tmp_path, search)).returncode == 0


def test_register_commands_adds_a_cli_command(site):
    assert mixcli(site, "example-hello", "bob").stdout == "hello, bob\n"
    assert "example-hello" in mixcli(site, "--help").stdout


def test_merge_method_loader_and_evaluator_hooks_end_to_end(site, tmp_path, llama_family):
    (tmp_path / "pointer.txt").write_text(str(llama_family["ft1"]))
    project = write_project(tmp_path, """
[models]
a = "link:pointer.txt"
[method]
name = "example_scale"
factor = 0.5
[output]
path = "out"
[[evaluation]]
evaluator = "example_tensor_count"
match = "mlp"
""")
    mixcli(site, "merge", project)
    source = tiny_models.load_tensors(llama_family["ft1"])
    merged = tiny_models.load_tensors(tmp_path / "out")
    assert merged.keys() == source.keys()
    assert all(torch.equal(merged[k], source[k] * 0.5) for k in source)
    results = json.loads((tmp_path / "out.eval.json").read_text())
    assert results[0]["metrics"] == {"tensors": 12, "elements": 12 * 64 * 160}


def test_upscaler_hook_builds_a_new_architecture(site, tmp_path, llama_family):
    project = write_project(tmp_path, f"""
[models]
a = "{llama_family['ft2']}"
[method]
name = "example_repeat_layers"
times = 2
[output]
path = "deep"
""")
    mixcli(site, "merge", project)
    config = json.loads((tmp_path / "deep" / "config.json").read_text())
    assert config["num_hidden_layers"] == 8
    source = tiny_models.load_tensors(llama_family["ft2"])
    deep = tiny_models.load_tensors(tmp_path / "deep")
    for out_layer in range(8):
        name = f"model.layers.{out_layer}.mlp.up_proj.weight"
        assert torch.equal(deep[name], source[f"model.layers.{out_layer // 2}.mlp.up_proj.weight"])
    assert torch.isfinite(tiny_models.logits(tmp_path / "deep")).all()


def stages_model(folder, seed: int, tied: bool):
    """A model of the plugin's own architecture: trunk.stage.N blocks, stem.embed, head.out."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    tensors = {"stem.embed.weight": torch.randn(8, 4, generator=generator),
               "trunk.norm.weight": torch.randn(4, generator=generator)}
    for i in range(3):
        tensors[f"trunk.stage.{i}.proj.weight"] = torch.randn(4, 4, generator=generator)
    if not tied:
        tensors["head.out.weight"] = torch.randn(8, 4, generator=generator)
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"))
    config = {"model_type": "mixcli-example-stages", "num_hidden_layers": 3, "tie_word_embeddings": tied}
    (folder / "config.json").write_text(json.dumps(config))
    return tensors


def test_register_architecture_layouts_teaches_mixcli_a_new_architecture(site, tmp_path):
    a = stages_model(tmp_path / "a", 0, tied=False)
    b = stages_model(tmp_path / "b", 1, tied=True)
    project = write_project(tmp_path, """
[models]
a = "a"
b = "b"
[method]
name = "passthrough"
[[slices]]
sources = [{ model = "a", layer_range = [0, 2] }]
[[slices]]
sources = [{ model = "b", layer_range = [1, 3] }]
[output]
path = "out"
""")
    mixcli(site, "merge", project)
    out = tiny_models.load_tensors(tmp_path / "out")
    want = {"stem.embed.weight": a["stem.embed.weight"], "trunk.norm.weight": b["trunk.norm.weight"],
            "head.out.weight": b["stem.embed.weight"],  # a tied last slice gives its embedding as head
            "trunk.stage.0.proj.weight": a["trunk.stage.0.proj.weight"],
            "trunk.stage.1.proj.weight": a["trunk.stage.1.proj.weight"],
            "trunk.stage.2.proj.weight": b["trunk.stage.1.proj.weight"],
            "trunk.stage.3.proj.weight": b["trunk.stage.2.proj.weight"]}
    assert out.keys() == want.keys() and all(torch.equal(out[k], want[k]) for k in want)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_hidden_layers"] == 4 and config["tie_word_embeddings"] is False
    listing = json.loads(mixcli(site, "plugins", "--json").stdout)
    example = next(p for p in listing["plugins"] if p["package"] == "mixcli-example-plugin")
    assert "layout:example_stages" in example["provides"]


def test_register_architectures_reaches_transformers_auto_classes(site):
    code = ("from mixcli.plugins import register_architectures; register_architectures(); "
            "from transformers import AutoConfig, AutoModel; c = AutoConfig.for_model('mixcli-example'); "
            "print(type(c).__name__, AutoModel._model_mapping[type(c)].__name__)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == ["ExampleConfig", "ExampleModel"]


@pytest.mark.parametrize("args", [["list-methods", "--json"], ["list-methods"], ["list-methods", "ties"]])
def test_help_and_list_methods_do_not_import_torch(site, args):
    code = (f"import sys, runpy; sys.argv = ['mixcli', *{args!r}];\n"
            "try:\n    runpy.run_module('mixcli', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', file=sys.stderr)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.stderr.strip().endswith("NO-TORCH"), out.stderr
