"""Config value checks for `__post_init__`: each raises a one-line ConfigError naming the full key.

Dataclasses built by Hydra already have the declared types; the same dataclasses built from
Python (tests, notebooks, other components) do not, so types are checked here too.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from sam3_core.errors import ConfigError


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def integer(key: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> None:
    """An int (not a bool) in [minimum, maximum]."""
    if not _is_int(value):
        raise ConfigError(f"{key}={value!r}: expected an integer")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{key}={value}: must be >= {minimum}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{key}={value}: must be <= {maximum}")


def number(
    key: str,
    value: Any,
    minimum: float | None = None,
    maximum: float | None = None,
    *,
    above: float | None = None,
    below: float | None = None,
) -> None:
    """A finite real number in [minimum, maximum], and > above, < below where given."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{key}={value!r}: expected a finite number")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{key}={value}: must be >= {minimum}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{key}={value}: must be <= {maximum}")
    if above is not None and value <= above:
        raise ConfigError(f"{key}={value}: must be > {above}")
    if below is not None and value >= below:
        raise ConfigError(f"{key}={value}: must be < {below}")


def boolean(key: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}={value!r}: expected true or false")


def string(key: str, value: Any, *, optional: bool = False, non_empty: bool = False) -> None:
    """A str (or None when optional); `non_empty` refuses ''."""
    if value is None and optional:
        return
    if not isinstance(value, str):
        raise ConfigError(f"{key}={value!r}: expected a string{' or null' if optional else ''}")
    if non_empty and not value.strip():
        raise ConfigError(f"{key}: must not be empty")


def one_of(key: str, value: Any, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(f"{key}={value!r}: must be one of {', '.join(choices)}")


def string_list(key: str, value: Any) -> None:
    if not isinstance(value, (list, tuple)) or not all(isinstance(item, str) for item in value):
        raise ConfigError(f"{key}={value!r}: expected a list of strings")


def integer_list(key: str, value: Any, minimum: int | None = None) -> None:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{key}={value!r}: expected a list of integers")
    for item in value:
        integer(key, item, minimum)
