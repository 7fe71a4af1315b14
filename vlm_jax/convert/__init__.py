"""Hugging Face <-> vlm_jax checkpoints: `model, params = from_hf(dir)`; `to_hf(model, params, out_dir)`.

One module per HF family provides a config mapping and a declarative key map (see keymap.py); a model family
names its module (`Family.hf_conversion`) and the HF model_types it imports (`Family.hf_model_types`)."""
from __future__ import annotations

import importlib
import json
import math
import re

import flax.linen as nn

from vlm_jax.config import ModelConfig
from vlm_jax.convert import safetensors_io
from vlm_jax.convert.keymap import flatten, from_per_layer, hf_to_ours, ours_to_hf, per_layer_shapes, unflatten
from vlm_jax.errors import ConfigError, ConversionError
from vlm_jax.families import Family, abstract_params, build_model, family_for_hf, get_family
from vlm_jax.models.layers import DTYPES
from vlm_jax.paths import user_path, write_atomic


def conversion_module(family: Family):
    """The module converting `family` from/to Hugging Face (config mapping, key map, components)."""
    if not family.hf_conversion:
        raise ConversionError(f"model.family '{family.name}' has no Hugging Face conversion")
    return importlib.import_module(family.hf_conversion)


def family_module(model_config: ModelConfig):
    return conversion_module(get_family(model_config))


def read_hf_config(hf_dir) -> dict:
    hf_dir = user_path(hf_dir, "--hf")
    if not hf_dir.is_dir():
        raise ConversionError(f"{hf_dir}: not a directory; pass a Hugging Face model directory")
    path = hf_dir / "config.json"
    if not path.is_file():
        raise ConversionError(f"{hf_dir}: no config.json; pass a Hugging Face model directory")
    try:
        hf = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path}: malformed JSON ({e})") from None
    if not isinstance(hf, dict):
        raise ConversionError(f"{path}: expected a JSON object")
    family_for_hf(hf.get("model_type"), str(path))
    return hf


def config_from_hf(hf_dir, **overrides) -> ModelConfig:
    hf = read_hf_config(hf_dir)
    where = str(user_path(hf_dir, "--hf") / "config.json")
    try:
        return conversion_module(family_for_hf(hf["model_type"], where)).config_from_hf(hf, where, **overrides)
    except ConfigError as e:
        raise ConversionError(f"{where}: {e}") from None


def _shapes(model) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in flatten(nn.meta.unbox(abstract_params(model))).items()}


def from_hf(hf_dir: str, **config_overrides):
    """Loads a Hugging Face safetensors directory; returns (model, params) with params as numpy arrays in the
    config's param_dtype. `config_overrides` set ModelConfig fields (e.g. dtype="float32", scan_layers=False)."""
    cfg = config_from_hf(hf_dir, **config_overrides)
    family = family_module(cfg)
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
    vlm_jax does not model. `params` is the parameter tree; its leaves may be anything np.asarray reads, each
    read once, one at a time, and written out before the next: leaves that load on access (a checkpoint's,
    `train.checkpoint.lazy_params`) keep one parameter in host memory, never the whole model."""
    if dtype not in DTYPES:
        raise ConversionError(f"export dtype '{dtype}' is not one of {', '.join(DTYPES)}")
    cfg = model.config
    family = family_module(cfg)
    layout, tensors = ours_to_hf(flatten(nn.meta.unbox(params)), _shapes(model), family.stacks(cfg),
                                 family.rules(cfg), DTYPES[dtype])
    safetensors_io.write_stream(out_dir, layout, tensors, max_shard_bytes)
    hf_config = family.config_to_hf(cfg, dtype, hf_config_base)
    out_dir = user_path(out_dir, "--out")
    write_atomic(out_dir / "config.json", json.dumps(hf_config, indent=2))
    write_atomic(out_dir / "generation_config.json", json.dumps(family.generation_config(cfg), indent=2))


def parameter_counts(model_config: ModelConfig) -> dict[str, int]:
    """Counts per component and in total, computed from abstract shapes: nothing is allocated, so real sizes
    are cheap. Components are the HF checkpoint's (the conversion module's COMPONENTS regexes over per-layer
    paths) for a family that converts, else the top-level parameter subtrees."""
    family = get_family(model_config)
    shapes = _shapes(build_model(model_config))
    if family.hf_conversion:
        module = conversion_module(family)
        per_layer = per_layer_shapes(shapes, module.stacks(model_config))
        components = module.COMPONENTS
    else:
        per_layer = shapes
        components = [(name, re.escape(name) + "/") for name in dict.fromkeys(p.split("/")[0] for p in shapes)]
    counts = {label: 0 for label, _ in components}
    for path, shape in per_layer.items():
        label = next(label for label, pattern in components if re.match(pattern, path))
        counts[label] += math.prod(shape)
    counts["total"] = sum(counts.values())
    return counts


__all__ = ["from_hf", "to_hf", "config_from_hf", "read_hf_config", "parameter_counts", "family_module",
           "conversion_module"]
