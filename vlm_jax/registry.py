"""The one registry mechanism (big_vision style): named entries added with a decorator, looked up by the
string a config names.

Every extension point of vlm-jax is one `Registry` below. Each knows the module whose import registers the
built-in entries (`populated_by`), and imports it on the first lookup: a config names a family or an image op
by string, so the layer that validates the config (which sits below the models and the data pipeline) finds
them without importing those layers. Entries added from outside (a test, a user's package) register with the
same decorator before the lookup.
"""
from __future__ import annotations

import importlib
from typing import Any

from vlm_jax.errors import ConfigError


class Registry:
    def __init__(self, what: str, config_key: str, populated_by: str):
        self.what, self.config_key, self.populated_by = what, config_key, populated_by
        self._entries: dict[str, Any] = {}
        self._populated = False

    def register(self, name: str):
        """Decorator: `@REGISTRY.register("name")` on a factory, class or object; returns it unchanged."""
        def wrap(entry):
            if name in self._entries and self._entries[name] is not entry:
                raise ValueError(f"{self.what} '{name}' is already registered")
            self._entries[name] = entry
            return entry
        return wrap

    def _populate(self):
        if not self._populated:
            self._populated = True
            importlib.import_module(self.populated_by)

    def names(self) -> list[str]:
        self._populate()
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        self._populate()
        return name in self._entries

    def get(self, name: str, where: str = ""):
        """The entry, or a one-line ConfigError naming the config key (`where` overrides it) and the choices."""
        if name not in self:
            raise ConfigError(f"{where or self.config_key}: unknown {self.what} '{name}'; use one of "
                              f"{', '.join(self.names())}")
        return self._entries[name]

    def items(self):
        self._populate()
        return sorted(self._entries.items())


FAMILIES = Registry("model family", "model.family", "vlm_jax.families")
CONNECTORS = Registry("connector", "model.connector.kind", "vlm_jax.models.connectors")
IMAGE_OPS = Registry("image op", "data.image.op", "vlm_jax.data.image_ops")
SOURCES = Registry("source kind", "data.sources[i].kind", "vlm_jax.data.sources")
TEMPLATES = Registry("template", "data.template", "vlm_jax.data.templates")
OBJECTIVES = Registry("objective", "the family's objective", "vlm_jax.objectives")
TRAIN_DATA = Registry("training data kind", "Family.train_data", "vlm_jax.train.data")
EVALUATORS = Registry("evaluator", "train.eval_examples", "vlm_jax.infer.evaluate")
