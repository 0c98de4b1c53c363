"""Helpers for the typed dataclass configs of pluggable components."""

from __future__ import annotations

import dataclasses
from typing import Any

from unimoe.errors import ConfigError


def config_from_dict(cls: type, data: dict[str, Any] | Any, *, where: str) -> Any:
    """Build a dataclass config from a dict, naming unknown fields."""
    if dataclasses.is_dataclass(data) and not isinstance(data, type):
        return data
    data = dict(data or {})
    data.pop("type", None)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; known fields: {', '.join(sorted(known))}")
    return cls(**_coerce_numbers(cls, data, where))


def _coerce_numbers(cls: type, data: dict[str, Any], where: str) -> dict[str, Any]:
    """YAML 1.1 reads ``2e-3`` as a string: turn strings into numbers for fields typed ``int`` / ``float``."""
    import typing

    try:
        hints = typing.get_type_hints(cls)
    except (NameError, TypeError):
        return data
    out = dict(data)
    for name, value in data.items():
        hint = hints.get(name)
        if not isinstance(value, str) or hint is None:
            continue
        args = set(typing.get_args(hint)) or {hint}
        for kind in (int, float):
            if kind in args:
                try:
                    out[name] = kind(value) if kind is float else int(value)
                    break
                except ValueError:
                    if kind is float:
                        raise ConfigError(f"{where}.{name}: expected a number, got {value!r}") from None
    return out
