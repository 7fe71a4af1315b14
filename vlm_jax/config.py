"""Typed configs: YAML files (with `base:` inheritance) + dotted `key=value` overrides, strictly validated.

Every user mistake raises `ConfigError` with one line naming the key, so the CLI can print it and exit.
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from vlm_jax.errors import ConfigError


# --------------------------------------------------------------------------------------------- model


@dataclass(frozen=True)
class RopeScaling:
    rope_type: str = "llama3"  # "llama3" or "default" (no scaling)
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class MllamaVisionConfig:
    hidden_size: int = 1280
    intermediate_size: int = 5120
    num_layers: int = 32  # local layers
    num_global_layers: int = 8
    num_heads: int = 16
    num_channels: int = 3
    image_size: int = 560  # tile side in pixels
    patch_size: int = 14
    max_num_tiles: int = 4
    norm_eps: float = 1e-5
    intermediate_layers_indices: tuple[int, ...] = (3, 7, 15, 23, 30)
    # "output": index i is the output of local layer i (transformers >= 4.56).
    # "input": index i is the state entering local layer i (transformers <= 4.54, Meta's reference).
    intermediate_layers_convention: str = "output"
    supported_aspect_ratios: tuple[tuple[int, int], ...] = (
        (1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1))
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_patches(self) -> int:
        """Tokens per tile including the class token."""
        return (self.image_size // self.patch_size) ** 2 + 1

    @property
    def padded_num_patches(self) -> int:
        return self.num_patches + (-self.num_patches) % 8

    @property
    def output_dim(self) -> int:
        return self.hidden_size * (1 + len(self.intermediate_layers_indices))


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 128256
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_layers: int = 40  # self-attention + cross-attention layers, one index space
    num_heads: int = 32
    num_kv_heads: int = 8
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = RopeScaling()
    max_position_embeddings: int = 131072
    cross_attention_layers: tuple[int, ...] = (3, 8, 13, 18, 23, 28, 33, 38)
    pad_token_id: int = 128004
    bos_token_id: int = 128000
    eos_token_id: tuple[int, ...] = (128001, 128008, 128009)
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def scan_period(self) -> int:
        """Layers per repeating block: the spacing of cross-attention layers (or 1 without any)."""
        xs = self.cross_attention_layers
        return xs[1] - xs[0] if len(xs) > 1 else (self.num_layers if xs else 1)

    @property
    def is_periodic(self) -> bool:
        """True when the layer stack is n identical blocks, so it can be scanned."""
        p, xs = self.scan_period, self.cross_attention_layers
        if self.num_layers % p:
            return False
        return tuple(xs) == tuple(range(xs[0], self.num_layers, p)) if xs else True


@dataclass(frozen=True)
class ModelConfig:
    family: str = "mllama"
    vision: MllamaVisionConfig = MllamaVisionConfig()
    text: TextConfig = TextConfig()
    image_token_index: int = 128256
    dtype: str = "bfloat16"  # compute dtype
    param_dtype: str = "float32"
    scan_layers: bool = True
    # "none": keep all activations; "full": recompute each layer; "dots": save matmul outputs only;
    # "dots_no_batch": save weight matmuls, recompute attention scores.
    remat_policy: str = "none"
    attention_impl: str = "xla"


# ---------------------------------------------------------------------------------------------- mesh


@dataclass(frozen=True)
class MeshConfig:
    # Sizes inside one slice (ICI); -1 takes the devices that are left. Product must equal the device count.
    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    # Across slices (DCN) for multi-slice runs; the product is the number of slices.
    dcn_data: int = 1
    dcn_fsdp: int = 1
    dcn_tensor: int = 1
    rules: str = "fsdp"  # a preset name in configs/mesh/ or a path to a YAML rule table


# -------------------------------------------------------------------------------------------- root


@dataclass(frozen=True)
class Config:
    model: ModelConfig = ModelConfig()
    mesh: MeshConfig = MeshConfig()
    seed: int = 0
    workdir: str = ""


# ------------------------------------------------------------------------------------------ loading

_DTYPES = ("float32", "bfloat16", "float16")
_REMAT = ("none", "full", "dots", "dots_no_batch")


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp, where: str):
    """Convert a YAML value to the annotated type, or raise a one-line ConfigError naming `where`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        last_error = None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                last_error = e
        raise last_error
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {_type_name(tp)}, got {value!r}")
        return from_dict(tp, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        try:  # YAML 1.1 reads exponents without a dot ("1e-6") as strings
            if isinstance(value, str):
                return float(value)
        except ValueError:
            pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if tp is Any:
        return value
    raise ConfigError(f"{where}: unsupported config type {tp}")


def from_dict(cls, data: dict, where: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ConfigError(f"unknown config key '{key}'; valid keys here: {', '.join(sorted(names))}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    """Plain YAML/JSON-friendly dict (tuples become lists)."""
    def plain(x):
        if dataclasses.is_dataclass(x):
            return {f.name: plain(getattr(x, f.name)) for f in dataclasses.fields(x)}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x
    return plain(cfg)


def deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_yaml(path: str, seen: tuple[str, ...] = ()) -> dict:
    path = os.path.abspath(path)
    if path in seen:
        raise ConfigError(f"{path}: `base:` includes form a cycle")
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{line}: malformed YAML ({getattr(e, 'problem', e)})") from None
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of config keys")
    bases = data.pop("base", [])
    merged: dict = {}
    for b in [bases] if isinstance(bases, str) else bases:
        merged = deep_merge(merged, _read_yaml(os.path.join(os.path.dirname(path), b), seen + (path,)))
    return deep_merge(merged, data)


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form dotted.key=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = dict(data)
    for item in overrides:
        keys, value = parse_override(item)
        node = data
        for k in keys[:-1]:
            child = node.get(k)
            node[k] = dict(child) if isinstance(child, dict) else {}
            node = node[k]
        node[keys[-1]] = value
    return data


def load_config(path: str | None = None, overrides: list[str] = (), cls=Config):
    data = _read_yaml(path) if path else {}
    data = apply_overrides(data, list(overrides))
    cfg = from_dict(cls, data)
    validate(cfg)
    return cfg


def load_model_config(data: dict) -> ModelConfig:
    cfg = from_dict(ModelConfig, data, "model")
    validate_model(cfg)
    return cfg


# --------------------------------------------------------------------------------------- validation


def _check(ok: bool, message: str):
    if not ok:
        raise ConfigError(message)


def validate_model(m: ModelConfig):
    v, t = m.vision, m.text
    _check(m.family == "mllama", f"model.family: '{m.family}' is not supported; use 'mllama'")
    _check(m.dtype in _DTYPES, f"model.dtype: '{m.dtype}' is not one of {_DTYPES}")
    _check(m.param_dtype in _DTYPES, f"model.param_dtype: '{m.param_dtype}' is not one of {_DTYPES}")
    _check(m.remat_policy in _REMAT, f"model.remat_policy: '{m.remat_policy}' is not one of {_REMAT}")
    _check(m.attention_impl == "xla", f"model.attention_impl: '{m.attention_impl}' is not supported; use 'xla'")
    for name in ("hidden_size", "intermediate_size", "num_heads", "patch_size", "image_size",
                 "max_num_tiles", "num_channels"):
        _check(getattr(v, name) > 0, f"model.vision.{name} must be positive, got {getattr(v, name)}")
    _check(v.hidden_size % v.num_heads == 0,
           f"model.vision.num_heads ({v.num_heads}) must divide model.vision.hidden_size ({v.hidden_size})")
    _check(v.image_size % v.patch_size == 0,
           f"model.vision.patch_size ({v.patch_size}) must divide model.vision.image_size ({v.image_size})")
    _check(v.intermediate_layers_convention in ("output", "input"),
           "model.vision.intermediate_layers_convention must be 'output' or 'input'")
    for i in v.intermediate_layers_indices:
        _check(0 <= i < v.num_layers,
               f"model.vision.intermediate_layers_indices: {i} is out of range for {v.num_layers} local layers")
    for a, b in v.supported_aspect_ratios:
        _check(1 <= a * b <= v.max_num_tiles,
               f"model.vision.supported_aspect_ratios: ({a}, {b}) needs more than max_num_tiles={v.max_num_tiles}")
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
        _check(getattr(t, name) > 0, f"model.text.{name} must be positive, got {getattr(t, name)}")
    _check(t.hidden_size % t.num_heads == 0,
           f"model.text.num_heads ({t.num_heads}) must divide model.text.hidden_size ({t.hidden_size})")
    _check(t.num_heads % t.num_kv_heads == 0,
           f"model.text.num_kv_heads ({t.num_kv_heads}) must divide model.text.num_heads ({t.num_heads})")
    _check(t.head_dim % 2 == 0, f"model.text head_dim ({t.head_dim}) must be even for RoPE")
    xs = t.cross_attention_layers
    _check(list(xs) == sorted(set(xs)), f"model.text.cross_attention_layers must be strictly increasing, got {list(xs)}")
    for i in xs:
        _check(0 <= i < t.num_layers,
               f"model.text.cross_attention_layers: {i} is out of range for num_layers={t.num_layers}")
    _check(not m.scan_layers or t.is_periodic,
           f"model.text.cross_attention_layers {list(xs)} are not evenly spaced over {t.num_layers} layers, "
           "so the stack cannot be scanned; set model.scan_layers=false")
    if t.rope_scaling is not None:
        _check(t.rope_scaling.rope_type in ("llama3", "default"),
               f"model.text.rope_scaling.rope_type: '{t.rope_scaling.rope_type}' is not 'llama3' or 'default'")
    _check(0 <= m.image_token_index < t.vocab_size + 8,
           f"model.image_token_index ({m.image_token_index}) must index the embedding table "
           f"(vocab_size + 8 = {t.vocab_size + 8} rows)")


def validate(cfg: Config):
    validate_model(cfg.model)
    for axis in ("data", "fsdp", "tensor"):
        n = getattr(cfg.mesh, axis)
        _check(n == -1 or n > 0, f"mesh.{axis} must be positive or -1 (auto), got {n}")
