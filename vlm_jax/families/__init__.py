"""Model families: one registered `Family` object each (see base.py), and the questions every layer above
asks about a model config, answered by its family.

Adding a family is one module with a `@register_family` class; importing it registers it.
"""
from __future__ import annotations

import flax.linen as nn
import jax

from vlm_jax.config import ModelConfig
from vlm_jax.data.spec import InputSpec
from vlm_jax.errors import ConfigError, ConversionError
from vlm_jax.families.base import Family, register_family, synthetic_text
from vlm_jax.families import contrastive, mllama, unified  # noqa: F401  (they register the built-in families)
from vlm_jax.registry import FAMILIES


def get_family(m: ModelConfig) -> Family:
    return FAMILIES.get(m.family, "model.family")


def generating_family(m: ModelConfig, what: str) -> Family:
    """The family of `m` when it generates; else one line saying that `what` needs one that does."""
    family = get_family(m)
    if family.generation_inputs is None:
        raise ConfigError(f"{what} needs a model family that generates; model.family '{family.name}' does not yet "
                          "(mllama does)")
    return family


def build_model(m: ModelConfig, decode: bool = False) -> nn.Module:
    return get_family(m).build(m, decode=decode)


def example_inputs(m: ModelConfig, batch: int = 1, seq_len: int = 8, num_images: int = 1) -> dict:
    return get_family(m).example_inputs(m, batch=batch, seq_len=seq_len, num_images=num_images)


def init_params(model: nn.Module, rng, **input_kwargs):
    """Boxed (logically partitioned) parameters; `nn.meta.unbox` them for plain arrays."""
    return model.init(rng, **example_inputs(model.config, **input_kwargs))["params"]


def abstract_params(model: nn.Module):
    """Parameter shapes/dtypes (with logical axes metadata) without allocating anything."""
    return jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0)))


def model_inputs(batch: dict, m: ModelConfig) -> dict:
    """The entries of `batch` that `m`'s model takes as keyword arguments."""
    return get_family(m).model_kwargs(batch)


def input_spec(m: ModelConfig) -> InputSpec:
    return get_family(m).input_spec(m)


def family_for_hf(model_type: str, where: str) -> Family:
    """The family that imports Hugging Face checkpoints of `model_type` (config.json's)."""
    found = [f for _, f in FAMILIES.items() if model_type in f.hf_model_types]
    if not found:
        supported = sorted(t for _, f in FAMILIES.items() for t in f.hf_model_types)
        raise ConversionError(f"{where}: model_type '{model_type}' is not supported; supported: "
                              f"{', '.join(supported)}")
    return found[0]


__all__ = ["Family", "register_family", "synthetic_text", "get_family", "generating_family", "build_model", "example_inputs",
           "init_params", "abstract_params", "model_inputs", "input_spec", "family_for_hf"]
