"""Reading data sets from local files with `datasets`, shared by every plugin that needs data.

`datasets` is imported only when a file is read, so the core does not depend on it; plugins
that call this list it among their own requirements.
"""

from __future__ import annotations

from pathlib import Path

from .errors import MixcliError, first_line

FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text",
           ".arrow": "arrow", ".safetensors": "safetensors"}


def load_rows(path: Path, where: str, max_samples: int = 0, what: str = "data file"):
    """A `datasets.Dataset` from a json/jsonl/csv/parquet/text file, a save_to_disk folder, or
    a safetensors file whose tensors (equal first dimension) are the columns."""
    import datasets

    path = Path(path)
    if not path.exists():
        raise MixcliError(f"{where}: {what} {path} does not exist")
    if path.is_file() and path.stat().st_size == 0:
        raise MixcliError(f"{where}: {what} {path} is empty")
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
        raise MixcliError(f"{where}: cannot read {path} ({first_line(error)})") from None
    if len(data) == 0:
        raise MixcliError(f"{where}: {what} {path} has no rows")
    if max_samples and len(data) > max_samples:
        data = data.select(range(max_samples))
    return data


def column(data, name: str, where: str, path: Path):
    """Column ``name`` of ``data``, or a one-line error listing the columns there are."""
    if name not in data.column_names:
        raise MixcliError(f"{where}: {path} has no column '{name}' (columns: {', '.join(data.column_names)})")
    return data[name]
