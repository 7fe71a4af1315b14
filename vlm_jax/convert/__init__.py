"""Hugging Face <-> vlm_jax checkpoints: `model, params = from_hf(dir)`; `to_hf(model, params, out_dir)`.

One module per HF family provides a config mapping and a declarative key map (see keymap.py)."""
from __future__ import annotations

import json
import math
import os
import re

import flax.linen as nn
import jax
import numpy as np

from vlm_jax.config import ModelConfig
from vlm_jax.convert import contrastive, idefics3, llava, mllama, safetensors_io
from vlm_jax.convert.keymap import flatten, from_per_layer, hf_to_ours, ours_to_hf, per_layer_shapes, \
    to_per_layer, unflatten
from vlm_jax.errors import ConfigError, ConversionError
from vlm_jax.models.layers import DTYPES
from vlm_jax.models.vlm import abstract_params, build_model

# HF model_type -> conversion module; our ModelConfig.family -> conversion module (the same names here).
FAMILIES = {mllama.MODEL_TYPE: mllama, llava.MODEL_TYPE: llava, idefics3.MODEL_TYPE: idefics3,
            **{t: contrastive for t in contrastive.MODEL_TYPES}}
_BY_FAMILY = dict(FAMILIES)


def family_module(family: str):
    return _BY_FAMILY[family]


def read_hf_config(hf_dir: str) -> dict:
    if not os.path.isdir(hf_dir):
        raise ConversionError(f"{hf_dir}: not a directory; pass a Hugging Face model directory")
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise ConversionError(f"{hf_dir}: no config.json; pass a Hugging Face model directory")
    try:
        with open(path) as f:
            hf = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path}: malformed JSON ({e})") from None
    if not isinstance(hf, dict):
        raise ConversionError(f"{path}: expected a JSON object")
    if hf.get("model_type") not in FAMILIES:
        raise ConversionError(f"{path}: model_type '{hf.get('model_type')}' is not supported; supported: "
                              f"{', '.join(sorted(FAMILIES))}")
    return hf


def config_from_hf(hf_dir: str, **overrides) -> ModelConfig:
    hf = read_hf_config(hf_dir)
    where = os.path.join(hf_dir, "config.json")
    try:
        return FAMILIES[hf["model_type"]].config_from_hf(hf, where, **overrides)
    except ConfigError as e:
        raise ConversionError(f"{where}: {e}") from None


def _shapes(model) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in flatten(nn.meta.unbox(abstract_params(model))).items()}


def from_hf(hf_dir: str, **config_overrides):
    """Loads a Hugging Face safetensors directory; returns (model, params) with params as numpy arrays in the
    config's param_dtype. `config_overrides` set ModelConfig fields (e.g. dtype="float32", scan_layers=False)."""
    cfg = config_from_hf(hf_dir, **config_overrides)
    family = family_module(cfg.family)
    model = build_model(cfg)
    shapes = _shapes(model)
    stacks = family.stacks(cfg)
    tensors = family.normalize_hf_keys(safetensors_io.read_dir(hf_dir))
    per_layer = hf_to_ours(tensors, family.rules(cfg), per_layer_shapes(shapes, stacks),
                           DTYPES[cfg.param_dtype], hf_dir)
    return model, unflatten(from_per_layer(per_layer, shapes, stacks))


def to_hf(model, params, out_dir: str, dtype: str = "float32", hf_config_base: dict | None = None,
          max_shard_bytes: int = 5 << 30):
    """Writes config.json (4.x layout), generation_config.json and safetensors loadable by
    `XForConditionalGeneration.from_pretrained`. `hf_config_base` (an imported config.json) keeps the fields
    vlm_jax does not model."""
    if dtype not in DTYPES:
        raise ConversionError(f"export dtype '{dtype}' is not one of {', '.join(DTYPES)}")
    cfg = model.config
    family = family_module(cfg.family)
    flat = {k: np.asarray(jax.device_get(v)) for k, v in flatten(nn.meta.unbox(params)).items()}
    tensors = ours_to_hf(to_per_layer(flat, family.stacks(cfg)), family.rules(cfg), DTYPES[dtype])
    safetensors_io.write_dir(out_dir, tensors, max_shard_bytes)
    hf_config = family.config_to_hf(cfg, dtype, hf_config_base)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump(family.generation_config(cfg), f, indent=2)


def parameter_counts(model_config: ModelConfig) -> dict[str, int]:
    """Counts per component (the family's COMPONENTS regexes over per-layer paths) and in total, computed
    from abstract shapes: nothing is allocated, so real sizes are cheap."""
    family = family_module(model_config.family)
    per_layer = per_layer_shapes(_shapes(build_model(model_config)), family.stacks(model_config))
    counts = {label: 0 for label, _ in family.COMPONENTS}
    for path, shape in per_layer.items():
        label = next(label for label, pattern in family.COMPONENTS if re.match(pattern, path))
        counts[label] += math.prod(shape)
    counts["total"] = sum(counts.values())
    return counts


__all__ = ["from_hf", "to_hf", "config_from_hf", "read_hf_config", "parameter_counts", "family_module", "FAMILIES"]
