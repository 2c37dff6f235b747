"""The layer-spec grammar: which source layers, in which order. Parsed, never evaluated.

A spec is a TOML array. Each element is

* an integer ``i``: layer ``i``;
* a pair of integers ``[a, b]``: layers ``a .. b-1`` (half-open, like ``layer_range``);
* a string holding one or more comma-separated items::

      item   := INT | slice | range
      slice  := [INT] ":" [INT] [":" INT]      start (default 0) : stop (default L) [: step >= 1]
      range  := "range(" INT "," INT ["," INT] ")"   Python range semantics (step may be < 0)
      INT    := "-"? DIGITS                     whitespace allowed around tokens

Negative numbers are rejected as integers and slice bounds; inside ``range(...)`` they are
allowed, but every resolved index must satisfy ``0 <= i < L``. An item that selects no layer
is an error, and so is anything else (names, expressions, floats, ``a-b``).
"""

from __future__ import annotations

import re

from mixcli import MixcliError

FORMS = ("accepted forms: an index like 5, a half-open slice like 0:24 or 8:32 or ::2, "
         "range(11, -1, -1), or a pair [0, 24]")
_INT = r"\s*(-?\d+)\s*"
_SLICE = re.compile(r"^\s*(-?\d+)?\s*:\s*(-?\d+)?\s*(?::\s*(-?\d+)\s*)?$")
_RANGE = re.compile(rf"^\s*range\s*\({_INT},{_INT}(?:,{_INT})?\)\s*$")
_DASH = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*$")


def split_items(text: str) -> list[str]:
    """Split at the commas that are not inside parentheses (``range(0, 4), 7`` → 2 items)."""
    items, depth, current = [], 0, []
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth <= 0:
            items.append("".join(current))
            current = []
        else:
            current.append(char)
    items.append("".join(current))
    return items


def _bad(item: str, where: str, why: str = "") -> MixcliError:
    dash = _DASH.match(item)
    hint = ""
    if dash:  # "0-23": inclusive ranges are easy to get wrong by one, so say what to write
        hint = f"; for layers {dash.group(1)}..{dash.group(2)} write {dash.group(1)}:{int(dash.group(2)) + 1}"
    return MixcliError(f"{where}: layer item {item.strip()!r} is not valid{why}{hint}; {FORMS}")


def _non_negative(value: str | None, item: str, where: str) -> int | None:
    if value is None:
        return None
    number = int(value)
    if number < 0:
        raise MixcliError(f"{where}: layer item {item.strip()!r} uses the negative number {number}; "
                          "write explicit layer indices (0 is the first layer)")
    return number


def parse_item(item: str, count: int, where: str) -> list[int]:
    """The layer indices one string item selects (unchecked against ``count`` except defaults)."""
    if not item.strip():
        raise MixcliError(f"{where}: empty layer item (a stray comma?); {FORMS}")
    match = re.fullmatch(_INT, item)
    if match:
        return [_non_negative(match.group(1), item, where)]
    match = _SLICE.match(item)
    if match:
        start, stop, step = (_non_negative(g, item, where) for g in match.groups())
        if step == 0:
            raise MixcliError(f"{where}: layer item {item.strip()!r} has step 0; the step must be >= 1")
        return list(range(0 if start is None else start, count if stop is None else stop, step or 1))
    match = _RANGE.match(item)
    if match:
        args = [int(g) for g in match.groups() if g is not None]
        if len(args) == 3 and args[2] == 0:
            raise MixcliError(f"{where}: layer item {item.strip()!r} has step 0; range() needs a non-zero step")
        return list(range(*args))
    raise _bad(item, where)


def _items(spec, where: str) -> list[tuple[str, list[int] | str]]:
    """(label, pre-resolved indices or string item) for every item of the spec."""
    if isinstance(spec, str):
        spec = [spec]
    if not isinstance(spec, list):
        raise MixcliError(f"{where}: the layer spec must be a list like [\"0:24\", \"8:32\"], got {spec!r}")
    out = []
    for element in spec:
        if isinstance(element, bool) or isinstance(element, float):
            raise MixcliError(f"{where}: layer item {element!r} is not valid; {FORMS}")
        if isinstance(element, int):
            if element < 0:
                raise MixcliError(f"{where}: layer item {element} is negative; write explicit layer "
                                  "indices (0 is the first layer)")
            out.append((str(element), [element]))
        elif isinstance(element, list):
            if (len(element) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in element)
                    or min(element) < 0):
                raise MixcliError(f"{where}: layer item {element!r} is not valid; a pair must be "
                                  f"[start, stop] with non-negative integers; {FORMS}")
            out.append((f"[{element[0]}, {element[1]}]", list(range(element[0], element[1]))))
        elif isinstance(element, str):
            out += [(piece.strip(), piece) for piece in split_items(element)]
        else:
            raise MixcliError(f"{where}: layer item {element!r} is not valid; {FORMS}")
    return out


def parse_layer_spec(spec, count: int, where: str) -> list[int]:
    """Resolve ``spec`` for a model of ``count`` layers to the list of source layer indices.

    ``where`` names the file and parameter, e.g. ``project.toml: [method] layers``.
    Raises :class:`mixcli.MixcliError` (one line) for anything not in the grammar.
    """
    items = _items(spec, where)
    if not items:
        raise MixcliError(f"{where}: the layer spec is empty; give at least one layer item, "
                          "e.g. [\"0:24\", \"8:32\"]")
    indices: list[int] = []
    for label, item in items:
        selected = parse_item(item, count, where) if isinstance(item, str) else item
        if not selected:
            raise MixcliError(f"{where}: layer item {label!r} selects no layers; for a model of "
                              f"{count} layers use start < stop, e.g. 0:{count}")
        bad = next((i for i in selected if not 0 <= i < count), None)
        if bad is not None:
            raise MixcliError(f"{where}: layer item {label!r} selects layer {bad}, which is out of range: "
                              f"the model has {count} layers (0..{count - 1})")
        indices += selected
    return indices
