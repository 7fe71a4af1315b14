"""Model families by name: `@register_model("llava")` on a Linen module class taking (config, decode)."""
from __future__ import annotations

import flax.linen as nn

MODELS: dict[str, type[nn.Module]] = {}


def register_model(*families: str):
    def wrap(cls):
        for family in families:
            MODELS[family] = cls
        return cls
    return wrap
