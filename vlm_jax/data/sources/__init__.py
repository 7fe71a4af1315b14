"""Record sources: a registry of random-access readers, one per `data.sources[i].kind`.

A source has `__len__` and `__getitem__(i) -> {"images": [bytes | path | uint8 array], "turns": [(role, text)]}`
and raises BadRecord for a record it cannot parse.
"""
from __future__ import annotations

from typing import Callable

from vlm_jax.config import ConfigError
from vlm_jax.data.config import SourceConfig

_SOURCES: dict[str, Callable] = {}


def register_source(kind: str):
    def wrap(factory):
        _SOURCES[kind] = factory
        return factory
    return wrap


def build_source(cfg: SourceConfig, where: str = "data.sources[?]"):
    """The reader for one configured source; a missing file or dataset is a one-line ConfigError."""
    if cfg.kind not in _SOURCES:
        raise ConfigError(f"{where}.kind: '{cfg.kind}' is not one of {sorted(_SOURCES)}")
    try:
        source = _SOURCES[cfg.kind](cfg)
    except (OSError, ValueError, KeyError) as e:
        message = str(e).split("\n")[0]
        raise ConfigError(f"{where} ({cfg.kind} '{cfg.name}'): {message}") from None
    if len(source) == 0:
        raise ConfigError(f"{where} ({cfg.kind} '{cfg.name}') has no records; check its path and split")
    return source


@register_source("embedded")
def _embedded(cfg: SourceConfig):
    from vlm_jax.data.sources.embedded import EmbeddedSource
    return EmbeddedSource(cfg.name, cfg.split, cfg.size)


@register_source("jsonl")
def _jsonl(cfg: SourceConfig):
    from vlm_jax.data.sources.jsonl import JsonlSource
    return JsonlSource(cfg.path, cfg.image_root)


@register_source("tfds")
def _tfds(cfg: SourceConfig):
    from vlm_jax.data.sources.tfds_source import TfdsSource
    return TfdsSource(cfg.name, cfg.path, cfg.split)
