"""Record sources: a registry of random-access readers, one per `data.sources[i].kind`.

A source has `__len__` and `__getitem__(i) -> {"images": [bytes | path | uint8 array], "turns": [(role, text)]}`
and raises BadRecord for a record it cannot parse.
"""
from __future__ import annotations

from vlm_jax.config import SourceConfig
from vlm_jax.errors import ConfigError
from vlm_jax.registry import SOURCES
from vlm_jax.data.sources import embedded, jsonl, tfds_source  # noqa: F401  (they register the built-in kinds)

register_source = SOURCES.register  # factory(SourceConfig) -> source


def build_source(cfg: SourceConfig, where: str = "data.sources[?]"):
    """The reader for one configured source; a missing file or dataset is a one-line ConfigError."""
    factory = SOURCES.get(cfg.kind, f"{where}.kind")
    try:
        source = factory(cfg)
    except (OSError, ValueError, KeyError) as e:
        message = str(e).split("\n")[0]
        raise ConfigError(f"{where} ({cfg.kind} '{cfg.name}'): {message}") from None
    if len(source) == 0:
        raise ConfigError(f"{where} ({cfg.kind} '{cfg.name}') has no records; check its path and split")
    return source

