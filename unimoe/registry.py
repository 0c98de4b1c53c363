"""A small registry per pluggable family: expert types, decoder families, encoders, connectors, diffusion decoders,
vocoders and dataset builders.

Usage::

    EXPERTS = Registry("expert type")

    @EXPERTS.register("ffn")
    class SwiGLUExperts(nn.Module): ...

    EXPERTS.get("ffn")      # the class
    EXPERTS.names()         # ["ffn", ...]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from unimoe.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj

        return decorator

    def get(self, name: str, *, field: str | None = None) -> T:
        if name not in self._items:
            where = f"{field}={name!r}" if field else repr(name)
            raise ConfigError(f"unknown {self.kind} {where}; choose one of: {', '.join(self.names())}")
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"
