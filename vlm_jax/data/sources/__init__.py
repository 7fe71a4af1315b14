"""Record sources: a registry of random-access readers, one per `data.sources[i].kind`.

A source has `__len__` and `__getitem__(i) -> {"images": [bytes | path | uint8 array], "turns": [(role, text)]}`
and raises BadRecord for a record it cannot parse.
"""
from __future__ import annotations

from vlm_jax.config import ConfigError
from vlm_jax.data.config import SourceConfig
from vlm_jax.data.registry import Registry

SOURCES = Registry("source kind", "data.sources[i].kind")
register_source = SOURCES.register  # factory(SourceConfig) -> source


def build_source(cfg: SourceConfig, where: str = "data.sources[?]"):
    """The reader for one configured source; a missing file or dataset is a one-line ConfigError."""
    if cfg.kind not in SOURCES.names():
        raise ConfigError(f"{where}.kind: '{cfg.kind}' is not one of {SOURCES.names()}")
    try:
        source = SOURCES.get(cfg.kind)(cfg)
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
