"""Writing TOML: the subset project files use (tables, arrays of tables, inline values).

``tomli`` only reads; recipes that mixcli generates (the stages of a multi-stage project)
are written with :func:`dumps`, and ``tomli.loads(dumps(data)) == data`` for every such
``data``.
"""

from __future__ import annotations

import json
import math
import re

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _key(key: str) -> str:
    return key if _BARE_KEY.match(key) else json.dumps(key)


def _value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # JSON string escapes are valid TOML
    if isinstance(value, list):
        return "[" + ", ".join(_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def inline(value) -> str:
    """One value as inline TOML (dicts as inline tables), e.g. for a line of a template."""
    return _value(value)


def _is_table_array(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(item, dict) for item in value)


def _emit(table: dict, path: list[str], lines: list[str]) -> None:
    scalars = {k: v for k, v in table.items() if not isinstance(v, dict) and not _is_table_array(v)}
    for key, value in scalars.items():
        lines.append(f"{_key(key)} = {_value(value)}")
    for key, value in table.items():
        if key in scalars:
            continue
        inner = path + [_key(key)]
        if isinstance(value, dict):
            lines += ["", f"[{'.'.join(inner)}]"]
            _emit(value, inner, lines)
        else:
            for item in value:
                lines += ["", f"[[{'.'.join(inner)}]]"]
                _emit(item, inner, lines)


def dumps(data: dict) -> str:
    """``data`` as TOML text: nested dicts become tables, lists of dicts arrays of tables."""
    lines: list[str] = []
    _emit(data, [], lines)
    return "\n".join(lines).lstrip("\n") + "\n"
