"""Router prompts: inline lists in the project, or a data set file read with ``datasets``."""

from __future__ import annotations

from pathlib import Path

from mixcli import MixcliError
from mixcli.datafiles import load_rows


def read_file(path: Path, field: str, limit: int, where: str) -> list[str]:
    """Column ``field`` of a data set file (see :func:`mixcli.datafiles.load_rows`; a .txt file: one
    prompt a line)."""
    data = load_rows(path, where, what="prompts file")
    column = "text" if path.suffix.lower() == ".txt" else field
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
