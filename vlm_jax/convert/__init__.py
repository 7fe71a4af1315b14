"""Hugging Face <-> vlm_jax checkpoints: `model, params = from_hf(dir)`; `to_hf(model, params, out_dir)`.

One module per HF family provides a config mapping and a declarative key map (see keymap.py); a model family
names its module (`Family.hf_conversion`) and the HF model_types it imports (`Family.hf_model_types`)."""
from __future__ import annotations

import importlib
import json
import math
import re

import flax.linen as nn
import jax
import numpy as np

from vlm_jax.config import ModelConfig
from vlm_jax.convert import safetensors_io
from vlm_jax.convert.keymap import check_hf, flatten, ours_to_hf, per_layer_shapes, rule_to_ours, stack_of, \
    unflatten
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


class HFWeights:
    """The safetensors of a Hugging Face directory as the parameter tree of `cfg`: names and shapes are checked on
    opening, from the headers alone (local files are memory-mapped, so nothing else is read yet); each leaf, or
    each layer of a stacked leaf, is converted when asked for."""

    def __init__(self, hf_dir, cfg: ModelConfig):
        family = family_module(cfg)
        self.shapes = _shapes(build_model(cfg))
        self.stacks, self.dtype = family.stacks(cfg), DTYPES[cfg.param_dtype]
        self.per_layer = per_layer_shapes(self.shapes, self.stacks)
        self.tensors = family.normalize_hf_keys(safetensors_io.read_dir(hf_dir))
        rules = family.rules(cfg)
        self.source = str(hf_dir)
        check_hf(self.tensors, rules, self.per_layer, self.source)
        self.rules = {r.ours: r for r in rules}

    def layers(self, path: str) -> int:
        """How many layers leaf `path` stacks on its axis 0 (0: not a stacked leaf)."""
        stack = stack_of(path, self.stacks)
        return stack.count if stack else 0

    def piece(self, path: str, layer: int | None = None) -> np.ndarray:
        """Leaf `path` in the config's param_dtype; for a stacked leaf only its layer `layer`."""
        stack = stack_of(path, self.stacks)
        name = path if stack is None else stack.layer_path(layer) + path[len(stack.prefix):]
        rule = self.rules[name]
        return rule_to_ours(rule, self.tensors[rule.hf], self.per_layer[name], self.dtype, self.source)

    def numpy(self):
        """The whole tree as host arrays."""
        return unflatten({p: np.stack([self.piece(p, b) for b in range(self.layers(p))]) if self.layers(p)
                          else self.piece(p) for p in self.shapes})

    def place(self, shardings):
        """The whole tree as global arrays with `shardings` (a tree like the params'). This process converts each
        HF tensor once and keeps only its own devices' distinct shards of one leaf at a time on the host."""
        flat = flatten(shardings)
        return unflatten({p: self._place_leaf(p, flat[p]) for p in self.shapes})

    def _place_leaf(self, path: str, sharding) -> jax.Array:
        shape = self.shapes[path]
        shards = {}  # distinct index -> (index, host buffer, devices holding it)
        for device, index in sharding.addressable_devices_indices_map(shape).items():
            key = tuple(sl.indices(n) for sl, n in zip(index, shape))  # slices are not hashable before 3.12
            shards.setdefault(key, (index, np.empty(sharding.shard_shape(shape), self.dtype), []))[2].append(device)
        if self.layers(path):
            for b in range(self.layers(path)):
                layer = self.piece(path, b)
                for index, buffer, _ in shards.values():
                    first, last, _ = index[0].indices(shape[0])
                    if first <= b < last:
                        buffer[b - first] = layer[index[1:]]
        else:
            whole = self.piece(path)
            for index, buffer, _ in shards.values():
                buffer[...] = whole[index]
        arrays = [jax.device_put(buffer, d) for _, buffer, devices in shards.values() for d in devices]
        return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


def from_hf(hf_dir: str, **config_overrides):
    """Loads a Hugging Face safetensors directory; returns (model, params) with params as numpy arrays in the
    config's param_dtype. `config_overrides` set ModelConfig fields (e.g. dtype="float32", scan_layers=False)."""
    cfg = config_from_hf(hf_dir, **config_overrides)
    return build_model(cfg), HFWeights(hf_dir, cfg).numpy()


def import_notes(model_config: ModelConfig) -> list[str]:
    """What the user must know about how an imported config.json was read (Mllama: the vision layer convention)."""
    module = family_module(model_config)
    return module.import_notes(model_config) if hasattr(module, "import_notes") else []


def export_config(cfg: ModelConfig, vision_layer_convention: str | None = None) -> tuple[ModelConfig, list[str]]:
    """The model config `to_hf` writes (the same model, Mllama's vision indices in the export's convention) and
    the notes about it; a ConversionError when it cannot be written."""
    if cfg.reward_head:
        raise ConversionError("model.reward_head: a reward model has no Hugging Face layout (its scalar head would be "
                              "dropped); score with `vlm-jax score`, or export the checkpoint it was trained from")
    family = family_module(cfg)
    if hasattr(family, "export_config"):
        return family.export_config(cfg, vision_layer_convention)
    if vision_layer_convention:
        raise ConversionError(f"--vision-layer-convention: model.family '{cfg.family}' has no intermediate vision "
                              "layer indices; leave it out")
    return cfg, []


def to_hf(model, params, out_dir: str, dtype: str = "float32", hf_config_base: dict | None = None,
          max_shard_bytes: int = 5 << 30, vision_layer_convention: str | None = None) -> list[str]:
    """Writes config.json (4.x layout), generation_config.json and safetensors loadable by
    `XForConditionalGeneration.from_pretrained`. `hf_config_base` (an imported config.json) keeps the fields
    vlm_jax does not model. `params` is the parameter tree; its leaves may be anything np.asarray reads, each
    read once, one at a time, and written out before the next: leaves that load on access (a checkpoint's,
    `train.checkpoint.lazy_params`) keep one parameter in host memory, never the whole model.
    `vision_layer_convention` picks the readers of Mllama's intermediate vision layer indices ("output":
    transformers 5.x, the default; "input": Meta's reference, transformers 4.x). Returns notes the user must know
    (which readers compute the trained model)."""
    if dtype not in DTYPES:
        raise ConversionError(f"export dtype '{dtype}' is not one of {', '.join(DTYPES)}")
    cfg, notes = export_config(model.config, vision_layer_convention)
    family = family_module(cfg)
    layout, tensors = ours_to_hf(flatten(nn.meta.unbox(params)), _shapes(model), family.stacks(cfg),
                                 family.rules(cfg), DTYPES[dtype])
    safetensors_io.write_stream(out_dir, layout, tensors, max_shard_bytes)
    hf_config = family.config_to_hf(cfg, dtype, hf_config_base)
    out_dir = user_path(out_dir, "--out")
    write_atomic(out_dir / "config.json", json.dumps(hf_config, indent=2))
    write_atomic(out_dir / "generation_config.json", json.dumps(family.generation_config(cfg), indent=2))
    return notes


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
        # A parameter HF's layout lacks (model.reward_head) is counted under its own name.
        label = next((label for label, pattern in components if re.match(pattern, path)),
                     ".".join(path.split("/")[:2]))
        counts[label] = counts.get(label, 0) + math.prod(shape)
    counts["total"] = sum(counts.values())
    return counts


__all__ = ["from_hf", "HFWeights", "to_hf", "export_config", "import_notes", "config_from_hf", "read_hf_config",
           "parameter_counts", "family_module", "conversion_module"]
