"""Parameter checks shared by moe_upcycle and moe_merge."""

from __future__ import annotations

from mixcli import MixcliError

from ._target import DEFAULT_AUX_LOSS_COEF, MODULES


def modules(value: list, where: str) -> tuple:
    if not value or any(m not in MODULES for m in value):
        bad = next((m for m in value if m not in MODULES), None) if value else None
        raise MixcliError(f"{where}: modules must be a non-empty subset of {', '.join(MODULES)}"
                          + (f"; '{bad}' is not one of them" if bad is not None else ""))
    return tuple(dict.fromkeys(value))


def layers(value: list, where: str) -> list[int] | None:
    if not value:
        return None
    if any(isinstance(v, bool) or not isinstance(v, int) for v in value):
        raise MixcliError(f"{where}: layers must be a list of layer indices, got {value!r}")
    return sorted(set(value))


def aux_loss_coef(context) -> float:
    value = context.sections.get("tune", {}).get("aux_loss_coef", DEFAULT_AUX_LOSS_COEF)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else DEFAULT_AUX_LOSS_COEF
