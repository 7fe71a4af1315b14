"""Record sources: a registry of random-access readers, one per `data.sources[i].kind`.

A source has `__len__` and `__getitem__(i) -> {"images": [bytes | path | uint8 array], "turns": [(role, text)]}`
and raises BadRecord for a record it cannot parse.
"""
from __future__ import annotations

from vlm_jax.config import SourceConfig
from vlm_jax.errors import ConfigError
from vlm_jax.paths import user_path
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


def check_present(cfg: SourceConfig, where: str):
    """A source's file or data_dir exists (cheap: nothing is read). Recipes name their data mixes by path for the
    user to fill in; an absent one is one line before anything is built, not a failure steps into a run."""
    if not cfg.path:
        return
    path = user_path(cfg.path, f"{where}.path")
    try:
        present = path.exists()
    except Exception as e:  # noqa: BLE001  (an object store unreachable or refusing: say so, in one line)
        raise ConfigError(f"{where} ({cfg.kind} '{cfg.name}'): cannot check {cfg.path} ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:160] if str(e) else ''}); check the path and your credentials") from None
    if not present:
        raise ConfigError(f"{where} ({cfg.kind} '{cfg.name}'): {cfg.path} does not exist; point {where}.path at "
                          "your data (a recipe's paths are placeholders to fill in)")
