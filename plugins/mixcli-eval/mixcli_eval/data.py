"""Reading evaluation data from local files with `datasets`."""

from __future__ import annotations

from pathlib import Path

from mixcli import MixcliError

FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text",
           ".arrow": "arrow", ".safetensors": "safetensors"}


def load_rows(path: Path, where: str, max_samples: int = 0):
    """A `datasets.Dataset` from a json/jsonl/csv/parquet/text file, a save_to_disk folder, or
    a safetensors file whose tensors (equal first dimension) are the columns."""
    import datasets

    path = Path(path)
    if not path.exists():
        raise MixcliError(f"{where}: data file {path} does not exist")
    datasets.disable_progress_bars()
    try:
        if path.is_dir():
            data = datasets.load_from_disk(str(path))
            if isinstance(data, datasets.DatasetDict):
                split = "test" if "test" in data else next(iter(data))
                data = data[split]
        else:
            kind = FORMATS.get(path.suffix.lower())
            if kind is None:
                raise MixcliError(f"{where}: cannot read {path.name}; use one of "
                                  f"{', '.join(sorted(FORMATS))} or a save_to_disk folder")
            if kind == "safetensors":
                from safetensors.numpy import load_file

                data = datasets.Dataset.from_dict(load_file(str(path)))
            else:
                data = datasets.load_dataset(kind, data_files=str(path), split="train")
    except MixcliError:
        raise
    except Exception as error:
        raise MixcliError(f"{where}: cannot read {path} ({str(error).splitlines()[0]})") from None
    if max_samples and len(data) > max_samples:
        data = data.select(range(max_samples))
    return data


def column(data, name: str, where: str, path: Path):
    if name not in data.column_names:
        raise MixcliError(f"{where}: {path} has no column '{name}' (columns: {', '.join(data.column_names)})")
    return data[name]


def load_causal_lm(folder: Path, dtype: str, device: str):
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype))
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer
