"""Validation helpers of the config dataclasses: each raises ``ValueError`` naming the field.

Messages read ``section.field=value is invalid: expected ...`` so that a bad YAML value is
found from the error alone.
"""

from __future__ import annotations

from typing import Any

def _fail(section: str, field: str, value: Any, allowed: str) -> None:
    raise ValueError(f"{section}.{field}={value!r} is invalid: expected {allowed}")


def _check_choice(section: str, field: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        _fail(section, field, value, "one of " + ", ".join(repr(c) for c in choices))


def _check_bools(section: str, cfg: Any, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(cfg, name)
        if not isinstance(value, bool):
            _fail(section, name, value, "true or false")


def _check_positive(section: str, field: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        _fail(section, field, value, "a positive number")




def _check_fraction(section: str, field: str, value: Any) -> None:
    """A number strictly between 0 and 1 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        _fail(section, field, value, "a number in (0, 1)")


def _check_int(section: str, name: str, value: Any, minimum: int = 1) -> None:
    """An integer (not a bool) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        _fail(section, name, value, f"an integer >= {minimum}")


def _check_positive_ints(section: str, cfg: Any, names: tuple[str, ...], minimum: int = 1):
    for name in names:
        _check_int(section, name, getattr(cfg, name), minimum)

