"""The tiny zoo is really trained (experts beat the base on their own task), and the demo's
merged rows are the merges: weight merges between the base and the experts, the average equal
to one computed here, the routed MoE above the weight merges."""

import json

import torch
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
    # the evolve demos (`examples/demo/evolve/`, written for a quick zoo at zoo/quick), [search] included
    searches = sorted((find_examples(None) / "evolve").glob(f"{family}-*.toml"))
    assert searches
    for example in searches:
        path = tmp_path / "checked" / f"evolve-{example.name}"
        path.write_text(example.read_text().replace("../../../zoo/quick/", (tmp_path / "zoo").resolve().as_posix() + "/"))
        checked = CliRunner().invoke(cli, ["validate", str(path)])
        assert checked.exit_code == 0, f"evolve/{example.name}: {checked.output}"


def assert_splits_are_disjoint(zoo, family: str) -> dict:
    """Each task of a built zoo family has train, validation and test files, named in the
    manifest and (vision) in each expert's task.json, with no example in two of them; returns
    the manifest."""
    from safetensors.torch import load_file

    manifest = json.loads((zoo / family / "manifest.json").read_text())
    tasks = [e["task"] for e in manifest["experts"]]
    for task in tasks + (["digits"] if family == "vision" else []):
        files = manifest["data"][task]
        assert set(files) == {"train", "validation", "test"}, (task, files)
        if family == "vision":
            rows = {split: load_file(zoo / file)["pixel_values"].flatten(1) for split, file in files.items()}
            sizes = {split: len(r) for split, r in rows.items()}
            # digits images are all distinct, so a shared row is an example in two splits
            every = torch.cat(list(rows.values())).unique(dim=0) if task == "digits" else None
            assert every is None or len(every) == sum(sizes.values()), task
        else:
            rows = {split: [json.loads(line)["prompt"] for line in (zoo / file).read_text().splitlines()]
                    for split, file in files.items()}
            sizes = {split: len(r) for split, r in rows.items()}
            assert len(set(rows["validation"])) == sizes["validation"] == sizes["test"], task
            for split in ("train", "test"):
                assert not set(rows["validation"]) & set(rows[split]), (task, split)
            assert not set(rows["train"]) & set(rows["test"]), task
            pretrain = {json.loads(line)["prompt"]
                        for line in (zoo / manifest["data"]["pretrain"]["train"]).read_text().splitlines()}
            assert not pretrain & (set(rows["validation"]) | set(rows["test"])), task
        assert sizes["validation"] > 0 and sizes["test"] > 0 and sizes["train"] > sizes["test"], (task, sizes)
    if family == "vision":  # the task files a classification evaluator reads name the same files
        for expert in manifest["experts"]:
            info = json.loads((zoo / expert["path"] / "task.json").read_text())
            assert {split: (zoo / expert["path"] / f).resolve() for split, f in info["data"].items()} == \
                {split: (zoo / f).resolve() for split, f in manifest["data"][expert["task"]].items()}
    return manifest


def average_of(folders, target):
    """The plain average of the models in ``folders``, computed here with torch, saved to ``target``."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    states = [load_file(folder / "model.safetensors") for folder in folders]
    save_file({name: torch.stack([s[name].double() for s in states]).mean(0).float() for name in states[0]},
              str(target / "model.safetensors"))
    shutil.copyfile(folders[0] / "config.json", target / "config.json")
    return states


def test_tiny_vision_demo_merges_land_between_the_base_and_the_experts(tmp_path):
    import torch
    from safetensors.torch import load_file

    from mixcli_zoo.demo import evaluate, family_evaluation

    zoo = tmp_path / "zoo"
    result = CliRunner().invoke(cli, ["demo", "--root", str(zoo), "--size", "tiny",
                                      "--families", "vision", "--only", "vision-average,vision-ties,vision-tsv_merge"])
    assert result.exit_code == 0, result.output
    assert "\r" not in result.output  # a log, not a terminal: plain lines only
    rows = json.loads((zoo / "demo" / "results.json").read_text())["vision"]
    assert set(rows) == {"base", "individual experts", "average", "ties", "tsv_merge"}
    base, experts = rows["base"], rows["individual experts"]
    tasks = [t for t in base if t != "mean"]
    assert len(tasks) == 6
    # seed 0 (margins measured: the smallest expert gain is 0.10, merges sit 0.07 above the base
    # and 0.21 below the experts): an unmerged, garbled or single-model output falls outside
    assert all(experts[t] > base[t] + 0.05 for t in tasks)
    for merge in ("average", "ties", "tsv_merge"):
        assert base["mean"] + 0.03 < rows[merge]["mean"] < experts["mean"] - 0.1, (merge, rows[merge])
    # the average row is the experts' average: weights and scores of one computed here
    manifest = json.loads((zoo / "vision" / "manifest.json").read_text())
    folders = [zoo / e["path"] for e in manifest["experts"]]
    (tmp_path / "reference").mkdir()
    average_of(folders, tmp_path / "reference")
    merged = load_file(zoo / "demo" / "out" / "vision-average" / "model.safetensors")
    reference = load_file(tmp_path / "reference" / "model.safetensors")
    assert set(merged) == set(reference)
    for name, tensor in reference.items():
        torch.testing.assert_close(merged[name], tensor, rtol=0, atol=1e-6, msg=name)
    evaluator, every_task, _ = family_evaluation("vision", manifest, zoo)
    scores = evaluate(tmp_path / "reference", evaluator, every_task)
    n_test = len(load_file(zoo / manifest["data"]["digits"]["test"])["labels"])
    assert all(abs(scores[t] - rows["average"][t]) < 1.5 / n_test for t in tasks)  # one test image at most
    # the validation split, named like the test split, is what an evaluator then measures:
    # accuracies computed here on the validation files, not on the test files
    assert_splits_are_disjoint(zoo, "vision")
    from transformers import ViTModel

    model = ViTModel.from_pretrained(tmp_path / "reference").eval()
    _, _, on_validation = family_evaluation("vision", manifest, zoo, split="validation")
    for expert in manifest["experts"][:2]:
        head = load_file(zoo / expert["path"] / "head.safetensors")
        data = load_file(zoo / manifest["data"][expert["task"]]["validation"])
        with torch.no_grad():
            logits = model(pixel_values=data["pixel_values"]).pooler_output @ head["weight"].T + head["bias"]
        expected = (logits.argmax(-1) == data["labels"]).double().mean().item()
        measured = evaluate(tmp_path / "reference", evaluator, on_validation[expert["task"]])[expert["task"]]
        n_validation = len(data["labels"])
        assert abs(measured - expected) < 1.5 / n_validation, expert["task"]
        assert round(measured * n_validation, 6) == round(measured * n_validation)  # k of the validation images
    assert (zoo / "demo" / "results.png").stat().st_size > 1000
    assert (zoo / "demo" / "out" / "vision-ties" / "model.safetensors").is_file()
    # every vision demo project (WE-MoE family included) passes `mixcli validate` on this zoo
    assert_every_demo_project_validates("vision", tmp_path, {"vision-we_moe", "vision-sparse_we_moe",
                                                             "vision-rank_one_moe", "vision-tsv_merge",
                                                             "vision-iso_c", "vision-iso_cts",
                                                             "vision-singular_projection_merging"})


def test_tiny_language_demo_moe_keeps_most_of_the_experts_and_every_project_validates(tmp_path):
    result = CliRunner().invoke(cli, ["demo", "--root", str(tmp_path / "zoo"), "--size", "tiny",
                                      "--families", "language", "--only",
                                      "language-average,language-ties,language-moe"])
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "zoo" / "demo" / "results.json").read_text())["language"]
    assert set(rows) == {"base", "individual experts", "individual experts (MLP-only)", "average", "ties", "moe"}
    assert [t for t in rows["base"] if t != "mean"] == ["rev", "sort", "shift", "comp"]
    means = {name: row["mean"] for name, row in rows.items()}
    # seed 0, measured: base 0, experts 0.165, average 0.020, TIES 0.025, MoE tuned 300 steps 0.110. The
    # tiny base knows none of the long tasks, so the weight merges stay near it and the routed
    # MoE, which runs each expert whole, keeps most of the experts' gain
    assert means["individual experts"] > means["base"] + 0.1
    for merge in ("average", "ties"):
        assert means["base"] <= means[merge] < means["individual experts"] - 0.1, merge
    assert means["moe"] > max(means["average"], means["ties"]) + 0.06
    assert means["moe"] > means["base"] + 0.08
    assert (tmp_path / "zoo" / "demo" / "out" / "language-moe-tuned" / "config.json").is_file()
    # the validation split (disjoint from every other) is what exact_match measures when named
    from mixcli_zoo.demo import evaluate, family_evaluation

    manifest = assert_splits_are_disjoint(tmp_path / "zoo", "language")
    evaluator, on_validation, _ = family_evaluation("language", manifest, tmp_path / "zoo", split="validation")
    assert on_validation["tasks"] == {t: str(tmp_path / "zoo" / manifest["data"][t]["validation"])
                                      for t in ("rev", "sort", "shift", "comp")}
    n_validation = len((tmp_path / "zoo" / manifest["data"]["rev"]["validation"]).read_text().splitlines())
    expert = tmp_path / "zoo" / manifest["experts"][0]["path"]
    score = evaluate(expert, evaluator, {"tasks": {"rev": on_validation["tasks"]["rev"]}})["rev"]
    assert round(score * n_validation, 6) == round(score * n_validation)
    assert_every_demo_project_validates("language", tmp_path, {"language-moe", "language-moe_mlp",
                                                               "language-ties", "language-tsv_merge",
                                                               "language-iso_c", "language-iso_cts",
                                                               "language-singular_projection_merging"})


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


def test_the_quick_demo_shortens_only_the_training_tables_it_names(tmp_path):
    import tomllib

    from mixcli_zoo.demo import RUNS, find_examples, render

    quick = RUNS["quick"]
    examples = find_examples(None)
    assert {p.stem for p in examples.glob("*.toml")} >= set(quick["projects"])
    for name in ("language-moe", "vision-we_moe", "vision-ties"):
        own = tomllib.loads(render(examples / f"{name}.toml", tmp_path / "zoo", tmp_path / "own").read_text())
        short = tomllib.loads(render(examples / f"{name}.toml", tmp_path / "zoo", tmp_path / "quick",
                                     quick["steps"]).read_text())
        for section, (key, steps) in quick["steps"].items():
            if section in own:
                assert short[section].pop(key) == steps < own[section].pop(key)
        assert short == own, name


def test_demo_root_never_removes_a_folder_it_did_not_build(tmp_path):
    # the zoo build removed ROOT/language whenever it held no matching manifest: a user's own
    # folder of that name went with it
    mine = tmp_path / "language"
    mine.mkdir()
    (mine / "thesis.txt").write_text("mine\n")
    result = CliRunner().invoke(cli, ["demo", "--root", str(tmp_path), "--families", "language", "--size", "tiny"])
    assert result.exit_code == 1, result.output
    assert result.output.strip() == (f"Error: {mine} exists and was not built by mixcli (no manifest.json); "
                                     "mixcli never removes it: choose another --root or move it away")
    assert (mine / "thesis.txt").read_text() == "mine\n"
