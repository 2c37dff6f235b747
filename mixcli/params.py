"""Typed, documented method parameters and how project values resolve into them.

A method declares its parameters as a dataclass whose fields are made with :func:`param`.
The project file may give each parameter as

* a scalar (``density = 0.5``);
* a gradient, a list of scalars interpolated across the layers of a slice
  (``t = [0.0, 0.5, 1.0]``);
* a filtered list, ``[{filter = "self_attn", value = ...}, {value = ...}]``: the first entry
  whose filter is a substring of the tensor name (or that has no filter, or ``"*"``) wins.

These are the value forms and the gradient rule of mergekit, so recipes compare number for
number. Filtered lists that match nothing fall through to the next level (model, global,
default).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any

from .errors import MixcliError


class _Required:
    def __repr__(self) -> str:
        return "required"


REQUIRED: Any = _Required()
NOTHING: Any = object()  # a level that says nothing for this tensor


def param(
    default: Any = REQUIRED,
    *,
    help: str,
    per_model: bool = False,
    min: float | None = None,
    max: float | None = None,
    min_exclusive: bool = False,
    choices: tuple | None = None,
    lifted_by: str | None = None,
    file: bool = False,
) -> Any:
    """Declare one method parameter (use as a dataclass field default).

    ``per_model`` parameters take one value per input model (``weight``, ``density``);
    shared ones take one value per output tensor (``t``, ``lambda``). A trailing underscore
    in the field name is dropped in the project file (``lambda_`` is written ``lambda``).
    ``min``/``max`` bound a number (``min_exclusive``: the bound itself is refused);
    ``lifted_by`` names a bool parameter that, set to true under [method], lifts the bounds
    (slerp's ``extrapolate``). ``file``: a path relative to the project file (the recipe written
    into an output makes it absolute).
    """
    meta = {"help": help, "per_model": per_model, "min": min, "max": max,
            "min_exclusive": min_exclusive, "choices": choices, "lifted_by": lifted_by, "file": file}
    if isinstance(default, (list, dict)):  # dataclasses want a factory for mutable defaults
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"mixcli": meta})
    return dataclasses.field(default=default, metadata={"mixcli": meta})


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    name: str  # as written in the project file
    field: str  # the dataclass field / keyword argument
    type: type
    default: Any
    help: str
    per_model: bool
    min: float | None
    max: float | None
    min_exclusive: bool
    choices: tuple | None
    lifted_by: str | None = None
    file: bool = False  # a path relative to the project file

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def describe_type(self) -> str:
        names = {float: "float", int: "int", bool: "bool", str: "str", list: "list", dict: "table"}
        return names.get(self.type, self.type.__name__)

    def describe_range(self) -> str:
        """``[0.0, 1.0]``, ``>= 1``, ``one of 'a', 'b'`` or an empty string."""
        if self.choices:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        low = "(" if self.min_exclusive else "["
        if self.min is not None and self.max is not None:
            text = f"{low}{self.min}, {self.max}]"
        elif self.min is not None:
            text = f"{'>' if self.min_exclusive else '>='} {self.min}"
        elif self.max is not None:
            text = f"<= {self.max}"
        else:
            return ""
        return text + (f" unless {self.lifted_by} = true" if self.lifted_by else "")

    def check(self, value: Any, where: str, bounded: bool | None = None) -> Any:
        """Validate one scalar against this parameter's type and range; return it typed.

        ``bounded`` says whether min/max apply; by default they do unless the parameter's
        bounds can be lifted (those are checked by :func:`check_setting`, which knows).
        """
        if bounded is None:
            bounded = self.lifted_by is None
        what = f"{where}: parameter '{self.name}'"
        if self.type is bool:
            if not isinstance(value, bool):
                raise MixcliError(f"{what} must be true or false, got {value!r}")
            return value
        if self.type in (int, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise MixcliError(f"{what} must be a number, got {value!r}")
            if self.type is int:
                if value != int(value):
                    raise MixcliError(f"{what} must be a whole number, got {value!r}")
                value = int(value)
            else:
                value = float(value)
            if not math.isfinite(value):
                raise MixcliError(f"{what} must be finite, got {value!r}")
            hint = f"; set {self.lifted_by} = true under [method] to allow it" if self.lifted_by else ""
            if not bounded:
                return value
            if self.min is not None and (value < self.min or (self.min_exclusive and value == self.min)):
                bound = ">" if self.min_exclusive else ">="
                raise MixcliError(f"{what} must be {bound} {self.min}, got {value!r}{hint}")
            if self.max is not None and value > self.max:
                raise MixcliError(f"{what} must be <= {self.max}, got {value!r}{hint}")
            return value
        if self.type in (list, dict):  # structured values (prompts, layer lists): taken whole
            if not isinstance(value, self.type):
                raise MixcliError(f"{what} must be a {'list' if self.type is list else 'table'}, got {value!r}")
            return value
        if self.type is str:
            if not isinstance(value, str):
                raise MixcliError(f"{what} must be a string, got {value!r}")
            if self.choices and value not in self.choices:
                options = ", ".join(repr(c) for c in self.choices)
                raise MixcliError(f"{what} must be one of {options}, got {value!r}")
            return value
        raise TypeError(f"unsupported parameter type {self.type!r}")

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "type": self.describe_type(),
            "default": None if self.required else self.default,
            "required": self.required,
            "per_model": self.per_model,
            "help": self.help,
            **({"min": self.min} if self.min is not None else {}),
            **({"max": self.max} if self.max is not None else {}),
            **({"choices": list(self.choices)} if self.choices else {}),
        }


def param_specs(params_class: type | None) -> dict[str, ParamSpec]:
    """The parameters a params dataclass declares, keyed by their project-file name."""
    if params_class is None:
        return {}
    hints = typing.get_type_hints(params_class)
    specs = {}
    for f in dataclasses.fields(params_class):
        meta = f.metadata.get("mixcli")
        if meta is None:
            raise TypeError(f"{params_class.__name__}.{f.name} must be declared with mixcli.param()")
        kind = hints[f.name]
        origin = typing.get_origin(kind)
        if origin is typing.Union or origin is types.UnionType:  # Optional[X] -> X
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
            origin = typing.get_origin(kind)
        if origin in (list, dict):
            kind = origin
        name = f.name.rstrip("_")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        specs[name] = ParamSpec(name=name, field=f.name, type=kind, default=default, **meta)
    return specs


def is_filtered_list(setting: Any) -> bool:
    if isinstance(setting, dict):
        return True
    return isinstance(setting, list) and bool(setting) and all(isinstance(e, dict) for e in setting)


def check_setting(spec: ParamSpec, setting: Any, where: str, lifted: bool = False) -> Any:
    """Validate a whole setting (scalar, gradient or filtered list) before any tensor is read.

    ``lifted``: the parameter's ``lifted_by`` switch is on, so its bounds do not apply.
    """
    if spec.type in (list, dict):
        return spec.check(setting, where)
    if is_filtered_list(setting):
        entries = [setting] if isinstance(setting, dict) else setting
        checked = []
        for i, entry in enumerate(entries):
            unknown = set(entry) - {"filter", "value"}
            if unknown or "value" not in entry:
                raise MixcliError(
                    f"{where}: parameter '{spec.name}' entry {i + 1} must be {{filter = \"...\", value = ...}}"
                    + (f"; unknown key '{sorted(unknown)[0]}'" if unknown else "; 'value' is missing"))
            filt = entry.get("filter")
            if filt is not None and not isinstance(filt, str):
                raise MixcliError(f"{where}: parameter '{spec.name}' entry {i + 1}: filter must be a string")
            checked.append({"filter": filt, "value": check_setting(spec, entry["value"], where, lifted)})
        return checked
    bounded = not lifted
    if isinstance(setting, list):
        if not setting:
            raise MixcliError(f"{where}: parameter '{spec.name}' is an empty list; give a value or a "
                              "gradient [a, b, ...] (or remove it for the default)")
        if any(isinstance(v, (list, dict)) for v in setting):
            raise MixcliError(f"{where}: parameter '{spec.name}' mixes lists and tables; "
                              "use a gradient [a, b, ...] or a filtered list [{filter=..., value=...}]")
        return [spec.check(v, where, bounded) for v in setting]
    return spec.check(setting, where, bounded)


def filters(setting: Any) -> list[str]:
    """The filter strings of a checked setting (nested filtered lists too), catch-alls left out."""
    if not (isinstance(setting, list) and setting
            and all(isinstance(e, dict) and set(e) == {"filter", "value"} for e in setting)):
        return []  # not a filtered list as check_setting leaves one (or a structured value)
    found = []
    for entry in setting:
        if entry["filter"] not in (None, "*"):
            found.append(entry["filter"])
        found += filters(entry["value"])
    return found


def matches(filt: str, name: str) -> bool:
    """Whether a filter (or an override's ``match``) applies to tensor ``name``."""
    return filt == "*" or filt in name


def evaluate(setting: Any, name: str, position: float) -> Any:
    """The value a checked setting takes for tensor ``name`` at gradient ``position`` in [0, 1].

    Returns :data:`NOTHING` when a filtered list has no matching entry or a list is empty.
    """
    if isinstance(setting, list) and setting and isinstance(setting[0], dict):
        for entry in setting:
            filt = entry["filter"]
            if filt is None or matches(filt, name):
                return evaluate(entry["value"], name, position)
        return NOTHING
    if isinstance(setting, list):
        if not setting:
            return NOTHING
        last = len(setting) - 1
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in setting):
            scaled = position * last
            lower = int(math.floor(scaled))
            upper = min(lower + 1, last)
            frac = scaled - lower
            return (1.0 - frac) * setting[lower] + frac * setting[upper]
        return setting[int(math.floor(position * last))]
    return setting


def _first_match(setting: Any, name: str) -> Any:
    """A structured value, or the value of the first matching entry of a filtered list."""
    if not (isinstance(setting, list) and setting
            and all(isinstance(e, dict) and "value" in e and set(e) <= {"filter", "value"} for e in setting)):
        return setting
    for entry in setting:
        filt = entry.get("filter")
        if filt is None or filt == "*" or filt in name:
            return entry["value"]
    return NOTHING


def resolve(spec: ParamSpec, levels: list[Any], name: str, position: float, where: str) -> Any:
    """First level (highest precedence first) that yields a value, else the default."""
    for setting in levels:
        if setting is NOTHING:
            continue
        if spec.type in (list, dict):  # structured: taken whole, through filters only
            value = _first_match(setting, name)
            if value is NOTHING:
                continue
            return value
        value = evaluate(setting, name, position)
        if value is not NOTHING:
            return spec.check(value, where)
    if spec.required:
        which = f" for tensor '{name}'" if name else ""  # whole-model methods resolve once, for no tensor
        raise MixcliError(f"{where}: parameter '{spec.name}' has no value{which}; "
                          f"set it under [method] or on the model")
    return spec.default
