"""Checks of config values where they are set, with errors that name the option."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def require(condition: bool, field: str, expected: str, value: Any, section: str = "strategy") -> None:
    """Raise a `ValueError` naming the config option `<section>.<field>` unless `condition` holds."""
    if not condition:
        raise ValueError(f"{section}.{field} must be {expected}, got {value!r}")


def require_choice(value: str, field: str, choices: Iterable[str], section: str = "strategy") -> None:
    """Raise a `ValueError` naming `<section>.<field>` unless `value` is one of `choices`."""
    choices = tuple(choices)
    require(value in choices, field, f"one of {', '.join(choices)}", value, section)
