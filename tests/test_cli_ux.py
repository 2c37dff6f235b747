"""Small CLI behaviours: `mixcli plugins` lists the commands plugins add; each `--param` of
`mixcli eval` belongs to the `--evaluator` before it."""

import json

from click.testing import CliRunner

from mixcli.cli import cli


def run(*args, code=0):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == code, result.output + repr(result.exception)
    return result


def test_plugins_lists_the_commands_plugins_add():
    rows = {row["package"]: row for row in json.loads(run("plugins", "--json").output)["plugins"]}
    assert "command:tune" in rows["mixcli-moe"]["provides"] and "method:moe_merge" in rows["mixcli-moe"]["provides"]
    assert "command:adapt" in rows["mixcli-wemoe"]["provides"]
    assert "command:demo" in rows["mixcli-zoo"]["provides"]
    assert not any(p.startswith("command:") for p in rows["mixcli-merge"]["provides"])
    table = run("plugins").output
    line = next(line for line in table.splitlines() if "mixcli-moe" in line)
    assert "command:tune" in line  # one row per plugin, not cut to 80 columns in a log


def test_each_param_belongs_to_the_evaluator_before_it(tmp_path, llama_family):
    model = llama_family["base"]
    notes = tmp_path / "notes.txt"
    notes.write_text("12+34=46\nabc:cba\nhello world\n")
    run("eval", model, "--evaluator", "perplexity", "--param", f"data={json.dumps(str(notes))}")
    alone = json.loads((model.parent / "base.eval.json").read_text())[0]["metrics"]
    run("eval", model, "--evaluator", "parameters", "--param", 'expert_marker="experts"')
    counted = json.loads((model.parent / "base.eval.json").read_text())[0]["metrics"]

    # before: `data` went to both evaluators, and `parameters` has no such parameter
    run("eval", model, "--evaluator", "perplexity", "--param", f"data={json.dumps(str(notes))}",
        "--evaluator", "parameters", "--param", "expert_marker=experts")
    rows = json.loads((model.parent / "base.eval.json").read_text())
    assert [row["evaluator"] for row in rows] == ["perplexity", "parameters"]
    assert rows[0]["metrics"] == alone and rows[1]["metrics"] == counted

    # a --param before the first --evaluator is every evaluator's
    result = run("eval", model, "--param", "max_samples=2", "--evaluator", "perplexity",
                 "--param", f"data={json.dumps(str(notes))}", "--evaluator", "parameters", code=1)
    assert result.output.strip() == ("Error: --evaluator parameters: unknown parameter 'max_samples' for "
                                     "evaluator 'parameters'")
