"""`mixcli init METHOD` for every method the registry holds (plugins' included): the template,
its model paths pointed at a tiny Llama family, validates and merges."""

import re

import pytest
import tomli
from click.testing import CliRunner

from mixcli.cli import cli
from mixcli.plugins import get_registry
from mixcli.template import model_names

METHODS = sorted(get_registry().methods)


def run(*args, code=0):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == code, result.output + repr(result.exception)
    return result


def point_at(text: str, family: dict) -> str:
    """The template with each models/NAME path replaced by a model of the family: the base for
    `base`, the fine-tunes in turn for the others."""
    experts = sorted(name for name in family if name != "base")
    order = []

    def replace(match):
        name = match.group(1)
        if name == "base":
            return f'"{family["base"]}"'
        order.append(name)
        return f'"{family[experts[(len(order) - 1) % len(experts)]]}"'

    return re.sub(r'"models/([A-Za-z0-9_]+)"', replace, text)


def test_the_registry_holds_every_family():
    # the parametrised test below covers what is registered; make sure that is everything installed
    assert {"linear", "slerp", "passthrough", "depth_upscaling", "moe_merge", "we_moe", "pwe_moe"} <= set(METHODS)


@pytest.mark.parametrize("method", METHODS)
def test_template_validates_and_merges(method, llama_family, tmp_path):
    project = tmp_path / "project.toml"
    run("init", method, "--out", project)
    text = project.read_text()
    data = tomli.loads(text)  # valid TOML as written, before any edit
    component = get_registry().methods[method]
    assert list(data["models"]) == model_names(component)
    assert data["method"]["name"] == method
    if getattr(component, "base", "ignored") != "ignored":
        assert data["method"]["base"] == "base"
    project.write_text(point_at(text, llama_family))
    result = run("validate", project)
    assert f"ok {project}: {method}, {len(data['models'])} models" in result.output
    run("merge", project, "--no-progress")
    out = tmp_path / data["output"]["path"]
    folders = [out] if (out / "config.json").is_file() else sorted(p for p in out.iterdir() if p.is_dir())
    assert folders, f"{out} holds no model"
    for folder in folders:
        assert (folder / "config.json").is_file() and list(folder.glob("*.safetensors")), folder
        assert (folder / "mixcli.toml").is_file()


def test_a_template_that_cannot_be_written_is_one_line(tmp_path):
    result = run("init", "linear", "--out", tmp_path / "missing" / "project.toml", code=1)
    assert result.output.startswith(f"Error: {tmp_path / 'missing' / 'project.toml'}: cannot write the project (")
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
