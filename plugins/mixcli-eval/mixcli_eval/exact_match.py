"""Exact match of greedy generation against reference answers, per task."""

from __future__ import annotations

from dataclasses import dataclass

from mixcli import Evaluator, MixcliError, param


@dataclass
class Params:
    data: str = param("", help="one prompt/answer file (.jsonl/.csv/.parquet or save_to_disk folder)")
    tasks: dict = param({}, help="several: task name -> prompt/answer file (instead of data)")
    prompt_field: str = param("prompt", help="column holding the prompt")
    answer_field: str = param("answer", help="column holding the expected answer")
    max_new_tokens: int = param(32, help="generation length limit", min=1)
    max_samples: int = param(0, help="evaluate at most this many pairs per task (0 = all)", min=0)
    batch_size: int = param(64, help="prompts per generate call", min=1)
    dtype: str = param("float32", help="dtype to run the model in", choices=("float32", "bfloat16", "float16"))


def task_files(params: dict) -> dict[str, str]:
    if bool(params["data"]) == bool(params["tasks"]):
        raise MixcliError("exact_match: give either data = \"file\" or tasks = {name = \"file\", ...}")
    return dict(params["tasks"]) or {"exact_match": params["data"]}


def evaluate(context) -> dict:
    from mixcli.datafiles import column, load_rows
    from mixcli_eval.data import load_causal_lm
    from mixcli_eval.metrics import exact_match

    p = context.params
    files = task_files(p)
    model, tokenizer = load_causal_lm(context, p["dtype"])
    pairs = {}
    for task, file in files.items():
        path = context.path(file)
        where = f"exact_match: task '{task}'"
        rows = load_rows(path, where, p["max_samples"])
        pairs[task] = (column(rows, p["prompt_field"], where, path), column(rows, p["answer_field"], where, path))
    scores = {}
    with context.progress(sum(len(prompts) for prompts, _ in pairs.values()), "prompts") as bar:
        for task, (prompts, answers) in pairs.items():
            scores[task] = exact_match(model, tokenizer, prompts, answers, max_new_tokens=p["max_new_tokens"],
                                       batch_size=p["batch_size"], advance=bar.advance)
    if len(scores) > 1:
        scores["mean"] = sum(scores.values()) / len(scores)
    return scores


EVALUATOR = Evaluator(name="exact_match", summary="exact match of greedy generation with the answers, per task",
                      evaluate=evaluate, params=Params,
                      metrics={"mean": "higher", "exact_match": "higher", "*": "higher"})
