"""Router prompts: inline lists in the project, or a data set file read with ``datasets``."""

from __future__ import annotations

from pathlib import Path

from mixcli import MixcliError

FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


def read_file(path: Path, field: str, limit: int, where: str) -> list[str]:
    """Column ``field`` of a local .jsonl/.json/.csv/.parquet file (a .txt file: one prompt a line)."""
    if not path.is_file():
        raise MixcliError(f"{where}: prompts file {path} does not exist")
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise MixcliError(f"{where}: prompts file {path} must end in {', '.join(FORMATS)}")
    import datasets

    datasets.disable_progress_bars()
    data = datasets.load_dataset(kind, data_files=str(path), split="train")
    column = "text" if kind == "text" else field
    if column not in data.column_names:
        raise MixcliError(f"{where}: {path} has no column '{column}' (columns: {', '.join(data.column_names)}); "
                          "set prompt_field")
    rows = [str(value) for value in data[column] if value is not None and str(value) != ""]
    return rows[:limit] if limit else rows


def gather(inline: list, file: str, project_dir: Path, field: str, limit: int, where: str) -> list[str]:
    if any(not isinstance(p, str) for p in inline):
        raise MixcliError(f"{where}: prompts must be strings, got {inline!r}")
    prompts = list(inline)
    if file:
        path = Path(file).expanduser()
        prompts += read_file(path if path.is_absolute() else project_dir / path, field, limit, where)
    return prompts
