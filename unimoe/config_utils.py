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


def _list_element_types(hint: Any) -> set:
    """The element types of a ``list[...]`` hint (also inside ``list[...] | None``); empty for other hints."""
    import typing

    candidates = [hint, *typing.get_args(hint)]  # list[X] itself, or the members of a union
    return {t for h in candidates if typing.get_origin(h) is list for t in typing.get_args(h)}


def _float_or_same(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return float(value)
    except ValueError:
        return value  # the config's own check names the field


def _coerce_numbers(cls: type, data: dict[str, Any], where: str) -> dict[str, Any]:
    """YAML 1.1 reads ``2e-3`` as a string: turn strings into numbers for fields typed ``int`` / ``float``, and the
    elements of fields typed ``list[float]`` (a lone string there becomes a number too)."""
    import typing

    try:
        hints = typing.get_type_hints(cls)
    except (NameError, TypeError):
        return data
    out = dict(data)
    for name, value in data.items():
        hint = hints.get(name)
        if hint is None:
            continue
        if float in _list_element_types(hint):
            out[name] = [_float_or_same(v) for v in value] if isinstance(value, list) else _float_or_same(value)
            continue
        if not isinstance(value, str):
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
