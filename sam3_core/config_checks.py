"""Checks for config values, called from the dataclasses' `__post_init__`.

Every failure is a `ConfigError` whose one line names the full key, the bad value and the
values that would do. The checks also refuse wrong types, because a dataclass built in Python
(not through Hydra) gets no type checking: `True` is not a count and `"0.5"` is not a number.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from sam3_core.errors import ConfigError

MISSING = "???"
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def fail(key: str, value: Any, expected: str) -> None:
    raise ConfigError(f"{key} must be {expected}, got {value!r}")


def check_int(key: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> None:
    """An integer (not a bool) within [minimum, maximum]."""
    expected = _range_text("an integer", minimum, maximum, False, False)
    if isinstance(value, bool) or not isinstance(value, int):
        fail(key, value, expected)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        fail(key, value, expected)


def check_float(
    key: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """A finite number within the range; `low_open` / `high_open` exclude the bound itself."""
    expected = _range_text("a finite number", low, high, low_open, high_open)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        fail(key, value, expected)
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        fail(key, value, expected)


def is_int64(value: int) -> bool:
    """True when an integer fits in 64 bits (numpy, torch and pycocotools hold ids and sizes so)."""
    return INT64_MIN <= value <= INT64_MAX


def check_bool(key: str, value: Any) -> None:
    if not isinstance(value, bool):
        fail(key, value, "true or false")


def check_choice(key: str, value: Any, choices: Iterable[str]) -> None:
    options = tuple(choices)
    if value not in options:
        fail(key, value, "one of " + ", ".join(options))


def check_str(key: str, value: Any, *, required: bool = False, optional: bool = False) -> None:
    """A string (None allowed when `optional`); `required` refuses the empty string."""
    if value is None and optional:
        return
    if not isinstance(value, str):
        fail(key, value, "a string" + (" or null" if optional else ""))
    if required and not value.strip():
        fail(key, value, "a non-empty string")


def check_str_list(key: str, value: Any) -> None:
    if not isinstance(value, (list, tuple)) or not all(isinstance(item, str) for item in value):
        fail(key, value, "a list of strings")


def check_int_list(key: str, value: Any, minimum: int | None = None) -> None:
    """A list of integers, each >= minimum where given."""
    expected = _range_text("a list of integers", minimum, None, False, False)
    if not isinstance(value, (list, tuple)):
        fail(key, value, expected)
    for item in value:
        if isinstance(item, bool) or not isinstance(item, int) or (minimum is not None and item < minimum):
            fail(key, value, expected)


def _range_text(kind: str, low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"{kind} in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{kind} {'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"{kind} {'<' if high_open else '<='} {high:g}"
    return kind


def check_uri(key: str, value: Any, *, required: bool = False) -> None:
    """A string the object store can address (plain path, file:// or s3://bucket/...)."""
    check_str(key, value, required=required)
    if not value or value == MISSING:
        return
    from sam3_core import storage  # boto3 is loaded only by configs that hold a URI
    from sam3_core.errors import StorageError

    try:
        storage.backend_for(value).check(value, need_key=False)
    except StorageError as exc:
        raise ConfigError(f"{key}: {exc}") from None
