"""Coercion of raw YAML / override values to the config's declared field types.

Kept apart from the schema (:mod:`glsd.config`): it knows typing's forms (Union, Literal,
tuple, list, dict, bool, int, float, str) and nothing about glsd's keys; every error names the
dotted key and the expected type.
"""
from __future__ import annotations

import typing
from typing import Any, Literal, Union

from glsd.errors import ConfigError


class OverrideText(str):
    """A ``key=value`` value as typed, with its YAML reading (``parsed``). A string key keeps
    the text (``output_dir=010`` is "010", not YAML 1.1's octal 8; ``12:30`` is not 750; a
    date stays text); every other type takes the reading."""

    parsed: Any

    def __new__(cls, text: str, parsed: Any) -> "OverrideText":
        obj = super().__new__(cls, text)
        obj.parsed = parsed
        return obj


def reading(value: Any) -> Any:
    """The YAML reading of a value (an :class:`OverrideText`'s ``parsed``, else itself; in a
    mapping, of every value: dotted overrides nest)."""
    if isinstance(value, dict):
        return {k: reading(v) for k, v in value.items()}
    return value.parsed if isinstance(value, OverrideText) else value


def coerce(value: Any, tp: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if isinstance(value, OverrideText) and tp is not str and origin is not Union:
        value = value.parsed  # a Union tries each member with the text and its reading
    if tp is Any:
        return value
    if origin is Union:
        if value is None and type(None) in args:
            return None
        # str last: it would accept a number (match_threshold=4.5 must stay a float).
        for arg in sorted(args, key=lambda a: a is str):
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"bad value {value!r} for '{key}': expected {type_name(tp)}")
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"bad value {value!r} for '{key}'. Valid values: {', '.join(map(str, args))}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"bad value {value!r} for '{key}': expected a list like [0.4, 1.0]")
        if origin is tuple and args and args[-1] is not Ellipsis and len(args) != len(value):
            raise ConfigError(f"bad value {value!r} for '{key}': expected {len(args)} items")
        item_types = args if origin is tuple and args and args[-1] is not Ellipsis else [args[0] if args else Any] * len(value)
        return origin(coerce(v, t, key) for v, t in zip(value, item_types))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"bad value {value!r} for '{key}': expected a mapping")
        return reading(value)  # free-form: the YAML reading
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"bad value {value!r} for '{key}': expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"bad value {value!r} for '{key}': expected an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML reads 1e-3 (no dot) as a string
            except ValueError:
                pass
        raise ConfigError(f"bad value {value!r} for '{key}': expected a number")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"bad value {value!r} for '{key}': expected a string")
    return value


def type_name(tp: Any) -> str:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    names = []
    for a in args:
        if typing.get_origin(a) is Literal:
            names.append(" | ".join(map(str, typing.get_args(a))))
        else:
            names.append(getattr(a, "__name__", str(a)))
    return " or ".join(names) + (" or null" if type(None) in typing.get_args(tp) else "")
