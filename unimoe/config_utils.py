"""Helpers for the typed dataclass configs of pluggable components."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from pathlib import Path
from typing import Any

from unimoe.errors import ConfigError


def read_yaml(path: Path, text: str | None = None) -> Any:
    """The YAML document in ``path`` (or ``text``, named by ``path``); a syntax error is a ConfigError naming the file
    and the line, not a parser traceback."""
    import yaml

    try:
        return yaml.safe_load(path.read_text() if text is None else text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{where}: not valid YAML ({problem})") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot be read ({err.strerror or err})") from None


def check_positive_ints(config: Any, names: tuple[str, ...] | list[str], where: str) -> None:
    """Each field of ``config`` in ``names`` is an integer >= 1 (``True`` is not a count); the error names
    ``where.<field>`` and the value."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{where}.{name}: must be a positive integer, got {value!r}")


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


def _describe_kinds(kinds: set) -> str:
    if float in kinds:
        return "a number"
    if int in kinds:
        return "an integer"
    return "true or false" if bool in kinds else "a string"


def _scalar_kinds(hint: Any) -> set:
    """The plain scalar types (``int``, ``float``, ``bool``, ``str``, and ``NoneType`` for ``| None``) a field hint
    allows. Other hints (lists, dicts, literals) give an empty set: the config's own checks judge those."""
    import types
    import typing

    args = set(typing.get_args(hint)) if typing.get_origin(hint) in (typing.Union, types.UnionType) else {hint}
    if not args <= {int, float, bool, str, type(None)}:
        return set()
    return args


def _checked_value(value: Any, kinds: set, where: str) -> Any:
    """``value`` as the field's scalar type, or a ConfigError naming the field. Strings become numbers (YAML 1.1
    reads ``2e-3`` as a string; ``key=value`` overrides may arrive as strings), integral floats become ints; null
    only where the hint allows ``None``."""
    if value is None:
        if type(None) in kinds:
            return value
        raise ConfigError(f"{where}: expected {_describe_kinds(kinds)}, got null")
    if float in kinds or int in kinds:
        if isinstance(value, str):
            with contextlib.suppress(ValueError):  # left as is: the message below names it
                value = float(value) if float in kinds else int(value)
        if isinstance(value, float) and int in kinds and float not in kinds and value.is_integer():
            value = int(value)
        ok_types = (int, float) if float in kinds else (int,)
        if isinstance(value, ok_types) and not isinstance(value, bool):
            return float(value) if float in kinds and int not in kinds else value
        raise ConfigError(f"{where}: expected {_describe_kinds(kinds)}, got {value!r}")
    if not isinstance(value, tuple(kinds)):  # bool / str fields
        raise ConfigError(f"{where}: expected {_describe_kinds(kinds)}, got {value!r}")
    return value


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    """A config class's resolved field hints, once per class: ``typing.get_type_hints`` costs ~0.2 ms, and
    ``MoEConfig`` is rebuilt (and so checked) on every labelled forward (``config.moe_config``)."""
    import typing

    try:
        return typing.get_type_hints(cls)
    except (NameError, TypeError):
        return {}


def _coerce_numbers(cls: type, data: dict[str, Any], where: str) -> dict[str, Any]:
    """Check and convert the fields typed ``int`` / ``float`` / ``bool`` / ``str`` (optionally ``| None``) and the
    elements of fields typed ``list[float]`` (a lone string there becomes a number too): strings become numbers
    (YAML 1.1 reads ``2e-3`` as a string), and a value of the wrong type is a ConfigError naming the field instead
    of a ``TypeError`` deep inside a comparison later."""
    hints = _type_hints(cls)
    out = dict(data)
    for name, value in data.items():
        hint = hints.get(name)
        if hint is None:
            continue
        if float in _list_element_types(hint):
            out[name] = [_float_or_same(v) for v in value] if isinstance(value, list) else _float_or_same(value)
            continue
        kinds = _scalar_kinds(hint)
        if kinds:
            out[name] = _checked_value(value, kinds, f"{where}.{name}")
    return out


def check_dataclass_fields(obj: Any, where: str) -> None:
    """:func:`_coerce_numbers` on a constructed dataclass, in place (for configs built with keyword arguments)."""
    data = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    for name, value in _coerce_numbers(type(obj), data, where).items():
        if value is not data[name]:
            object.__setattr__(obj, name, value)
