"""The tiny zoo is really trained (experts beat the base on their own task) and the demo runs end to end."""

import json

from click.testing import CliRunner

from mixcli.cli import cli


def assert_every_demo_project_validates(family: str, tmp_path, required: set[str]) -> None:
    """Every ``examples/demo/<family>-*.toml`` (``required`` among them) passes `mixcli validate`
    against the zoo built under ``tmp_path/zoo``."""
    from mixcli_zoo.demo import find_examples, render

    examples = sorted(find_examples(None).glob(f"{family}-*.toml"))
    assert {p.stem for p in examples} >= required
    for example in examples:
        path = render(example, tmp_path / "zoo", tmp_path / "checked")
        checked = CliRunner().invoke(cli, ["validate", str(path)])
        assert checked.exit_code == 0, f"{example.name}: {checked.output}"


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
    assert_every_demo_project_validates("vision", tmp_path, {"vision-we_moe", "vision-sparse_we_moe",
                                                             "vision-rank_one_moe"})


def test_tiny_language_demo_runs_and_every_language_project_validates(tmp_path):
    result = CliRunner().invoke(cli, ["demo", "--root", str(tmp_path / "zoo"), "--size", "tiny",
                                      "--families", "language", "--only", "language-average,language-ties"])
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "zoo" / "demo" / "results.json").read_text())["language"]
    assert set(rows) == {"base", "individual experts", "individual experts (MLP-only)", "average", "ties"}
    assert [t for t in rows["base"] if t != "mean"] == ["rev", "sort", "shift", "comp"]
    assert rows["individual experts"]["mean"] > rows["base"]["mean"]
    assert_every_demo_project_validates("language", tmp_path, {"language-moe", "language-moe_mlp",
                                                               "language-ties"})


def test_language_zoo_prompts_have_no_unknown_tokens_and_tasks_keep_their_characters():
    import random

    from mixcli_zoo.language import ALPHABET, PRETRAIN_MIX, TASK_CHARS, make_example
    from mixcli_zoo.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer(ALPHABET)
    rng = random.Random(0)
    for task in PRETRAIN_MIX:
        for long in (False, True):
            ex = make_example(task, rng, long)
            ids = tok(ex["prompt"] + ex["answer"])["input_ids"]
            assert tok.unk_token_id not in ids, ex
            assert tok.decode(ids, skip_special_tokens=True) == ex["prompt"] + ex["answer"]
    assert tok("rev:")["input_ids"] != tok("len:")["input_ids"]
    # an expert task's words and answers use its own characters only
    ex = make_example("comp", random.Random(1), long=True)
    assert set(ex["prompt"].split(":")[1][:-1]) <= set(TASK_CHARS["comp"])
    assert ex["answer"] == "".join(str(9 - int(c)) for c in ex["prompt"][5:-1])
    ex = make_example("shift", random.Random(2), long=True)
    assert ex["answer"] == "".join("ABCDEFGHIJ"[("ABCDEFGHIJ".index(c) + 1) % 10] for c in ex["prompt"][6:-1])
