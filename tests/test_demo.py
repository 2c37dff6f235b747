"""The tiny zoo is really trained (experts beat the base on their own task) and the demo runs end to end."""

import json

from click.testing import CliRunner

from mixcli.cli import cli


def test_tiny_demo_runs_end_to_end_and_experts_beat_the_base(tmp_path):
    result = CliRunner().invoke(cli, ["demo", "--root", str(tmp_path / "zoo"), "--size", "tiny",
                                      "--families", "vision", "--only", "vision-average,vision-ties"])
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "zoo" / "demo" / "results.json").read_text())["vision"]
    assert set(rows) == {"base", "individual experts", "average", "ties"}
    tasks = [t for t in rows["base"] if t != "mean"]
    assert len(tasks) == 6
    assert all(rows["individual experts"][t] > rows["base"][t] for t in tasks)
    assert (tmp_path / "zoo" / "demo" / "results.png").stat().st_size > 1000
    assert (tmp_path / "zoo" / "demo" / "out" / "vision-ties" / "model.safetensors").is_file()
    # every vision demo project (WE-MoE family included) passes `mixcli validate` on this zoo
    from mixcli_zoo.demo import find_examples, render

    examples = sorted(find_examples(None).glob("vision-*.toml"))
    assert {p.stem for p in examples} >= {"vision-we_moe", "vision-sparse_we_moe", "vision-rank_one_moe"}
    for example in examples:
        path = render(example, tmp_path / "zoo", tmp_path / "checked")
        checked = CliRunner().invoke(cli, ["validate", str(path)])
        assert checked.exit_code == 0, f"{example.name}: {checked.output}"
