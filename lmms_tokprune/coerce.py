"""Strict conversion of option values (torch-free; the one place bool / int / float coercion lives).

lmms-eval type-guesses ``--model_args`` values (``1`` -> int, ``-1`` -> float, ``true`` -> bool, the rest
str) and YAML files give native types, so every option value is converted to its declared type here. Each
function raises ``ValueError`` with a short reason; callers put the option's name in front of it.
"""

from __future__ import annotations

import math
from typing import Any

TRUE_WORDS = ("true", "1", "yes")
FALSE_WORDS = ("false", "0", "no")
NONE_WORDS = ("none", "null", "")


def is_none_word(value: Any) -> bool:
    """None itself, or a string that spells it (``none``, ``null``, empty)."""
    return value is None or (isinstance(value, str) and value.strip().lower() in NONE_WORDS)


def to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in TRUE_WORDS + FALSE_WORDS:
        return value.strip().lower() in TRUE_WORDS
    raise ValueError("must be true or false")


def to_int(value: Any) -> int:
    """An integral number (``64``, ``64.0``, ``"64"``); booleans are not numbers here."""
    if isinstance(value, bool):
        raise ValueError("must be an integer")
    try:
        as_float = float(value)
    except (TypeError, ValueError):
        raise ValueError("must be an integer") from None
    if not math.isfinite(as_float) or not as_float.is_integer():
        raise ValueError("must be an integer")
    return int(as_float)


def to_float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("must be a number")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError("must be a number") from None


LIST_SEPARATORS = ("/", ";", " ")  # a list in model_args: lmms-eval splits the string on commas, so 8/16/24


def to_list(value: Any, item: type) -> tuple:
    """A list of numbers: a YAML / Python list, or a string such as '8/16/24' or '[8;16;24]'."""
    if isinstance(value, str):
        text = value.strip().strip("[]()")
        for sep in LIST_SEPARATORS:
            text = text.replace(sep, ",")
        value = [v for v in text.split(",") if v.strip()]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError("must be a non-empty list (in model_args: items separated by '/', e.g. 8/16/24)")
    return tuple(to_kind(item, v) for v in value)


def format_value(value: Any) -> str:
    """A value as model_args text: lists as 8/16/24 (what to_list reads back), numbers without a trailing .0."""
    if isinstance(value, (list, tuple)):
        return "/".join(format_value(v) for v in value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def to_kind(kind: type, value: Any) -> Any:
    """Convert to bool / int / float / str (or call ``kind``) with the rules above."""
    if kind is bool:
        return to_bool(value)
    if kind is int:
        return to_int(value)
    if kind is float:
        return to_float(value)
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"must be of type {kind.__name__}") from None
