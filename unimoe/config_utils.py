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
    return cls(**data)
