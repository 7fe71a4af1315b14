"""A named registry of factories (big_vision style), shared by sources, image ops and templates."""
from __future__ import annotations

from typing import Callable


class Registry:
    def __init__(self, what: str, config_key: str):
        self.what, self.config_key = what, config_key  # for the error message: "unknown image op 'x'; data.image.op ..."
        self._entries: dict[str, Callable] = {}

    def register(self, name: str):
        """Decorator: `@REGISTRY.register("name")` on a factory function or class."""
        def wrap(factory):
            self._entries[name] = factory
            return factory
        return wrap

    def names(self) -> list[str]:
        return sorted(self._entries)

    def get(self, name: str) -> Callable:
        if name not in self._entries:
            raise ValueError(f"unknown {self.what} '{name}'; {self.config_key} must be one of {self.names()}")
        return self._entries[name]
