"""Mean next-token loss and perplexity of a causal LM on a local text data set."""

from __future__ import annotations

import math
from dataclasses import dataclass

from mixcli import Evaluator, param


@dataclass
class Params:
    data: str = param(help="text data: .txt (one sample per line), .jsonl/.csv/.parquet, or a save_to_disk folder")
    text_field: str = param("text", help="column holding the text")
    max_samples: int = param(0, help="evaluate at most this many samples (0 = all)", min=0)
    batch_size: int = param(16, help="samples per forward pass", min=1)
    dtype: str = param("float32", help="dtype to run the model in", choices=("float32", "bfloat16", "float16"))


def evaluate(context) -> dict:
    from mixcli.datafiles import column, load_rows
    from mixcli_eval.data import load_causal_lm
    from mixcli_eval.metrics import mean_token_loss

    p = context.params
    path = context.path(p["data"])
    rows = load_rows(path, "perplexity: data", p["max_samples"])
    texts = [t for t in column(rows, p["text_field"], "perplexity: text_field", path) if t and t.strip()]
    model, tokenizer = load_causal_lm(context, p["dtype"])
    with context.progress(len(texts), "texts") as bar:
        loss = mean_token_loss(model, tokenizer, texts, batch_size=p["batch_size"], advance=bar.advance)
    return {"loss": loss, "perplexity": math.exp(loss)}


EVALUATOR = Evaluator(name="perplexity", summary="mean token loss and perplexity on a text data set",
                      evaluate=evaluate, params=Params, metrics={"loss": "lower", "perplexity": "lower"})
