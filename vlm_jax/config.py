"""Typed configs: YAML files (with `base:` inheritance) + dotted `key=value` overrides, strictly validated.

Every user mistake raises `ConfigError` with one line naming the key, so the CLI can print it and exit.
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass
from typing import Any

import yaml

from vlm_jax.errors import ConfigError
from vlm_jax.data.config import DataConfig, validate_data  # after ConfigError: data/ imports it back


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
    # Initial value of the cross-attention tanh gates. 0 (Mllama, Flamingo) leaves a pretrained language model
    # untouched at the start; a model trained from nothing learns to use the image much sooner with open gates.
    cross_attention_gate_init: float = 0.0
    pad_token_id: int = 128004
    bos_token_id: int = 128000
    eos_token_id: tuple[int, ...] = (128001, 128008, 128009)
    tie_word_embeddings: bool = False
    extra_embeddings: int = 8  # learnable rows after the vocabulary (Mllama's `<|image|>`); 0 for LLaVA/Idefics3

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
class ViTConfig:
    """A CLIP or SigLIP ViT (one module; `kind` selects the published architecture's structural details)."""
    # "clip": class token, pre-layernorm (`pre_layrnorm`), patch conv without bias, pooled at the class token.
    # "siglip": no class token, patch conv with bias, pooled by an attention head (if `pooling_head`).
    kind: str = "clip"
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    num_channels: int = 3
    image_size: int = 336
    patch_size: int = 14
    norm_eps: float = 1e-5  # CLIP 1e-5, SigLIP 1e-6
    hidden_act: str = "quick_gelu"  # "quick_gelu" (CLIP), "gelu_pytorch_tanh" (SigLIP), "gelu"
    pooling_head: bool = False  # SigLIP's attention-pooling head; kept as parameters even where unused (LLaVA)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def class_token(self) -> bool:
        return self.kind == "clip"

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.patches_per_side ** 2 + int(self.class_token)


@dataclass(frozen=True)
class ConnectorConfig:
    """Vision features -> text embeddings, for the unified (LLaVA/Idefics3/POINTS) families."""
    kind: str = "mlp"  # a registered connector: "mlp", "pixel_shuffle", "perceiver", "dual_mlp"
    # Hidden states to take from the tower: 0 = embeddings, i = output of layer i-1, negative counts from the
    # end (-1 = last layer, before post_layernorm). Several are concatenated on channels. Empty = the
    # post-layernormed last layer (Idefics3).
    feature_layers: tuple[int, ...] = (-2,)
    feature_strategy: str = "default"  # "default" drops the class token, "full" keeps every token
    hidden_act: str = "gelu"  # mlp / dual_mlp
    bias: bool = True  # mlp / dual_mlp
    scale_factor: int = 2  # pixel_shuffle: s x s patches become one token
    num_latents: int = 64  # perceiver
    num_layers: int = 3  # perceiver
    num_heads: int = 16  # perceiver


@dataclass(frozen=True)
class TextEncoderConfig:
    """The text tower of a contrastive dual encoder (CLIP: causal, pooled at eos; SigLIP: bidirectional,
    pooled at the last token)."""
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_layers: int = 12
    num_heads: int = 8
    max_position_embeddings: int = 77
    norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    eos_token_id: int = 49407  # CLIP pools at the first eos (at argmax(ids) when 2, as old checkpoints)
    pad_token_id: int = 1
    bos_token_id: int = 49406
    projection_dim: int = 512  # CLIP's shared embedding width; SigLIP's text head output (= hidden_size)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class ModelConfig:
    family: str = "mllama"  # one of FAMILIES
    vision: MllamaVisionConfig = MllamaVisionConfig()
    text: TextConfig = TextConfig()
    vit: ViTConfig | None = None  # CLIP/SigLIP tower of the llava, idefics3, clip and siglip families
    ocr_vit: ViTConfig | None = None  # POINTS' second (OCR) tower, merged by the "dual_mlp" connector
    connector: ConnectorConfig = ConnectorConfig()
    text_encoder: TextEncoderConfig | None = None  # clip / siglip text tower
    logit_scale_init: float = 2.6592  # log(1/0.07); SigLIP uses log(10)
    logit_bias_init: float = -10.0  # SigLIP only
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



# --------------------------------------------------------------------------------------------- train

NO_DECAY_DEFAULT = (r".*/bias", r".*norm[^/]*/scale", r"(.*/)?[a-z_]*gate(_attn|_ffn)?", r"(.*/)?[a-z_]*embedding")


@dataclass(frozen=True)
class LrGroup:
    pattern: str = ""  # regex over parameter paths ("vision/.*"); the first matching group wins
    learning_rate: float = 0.0  # peak learning rate for the group (same schedule shape as the stage)


@dataclass(frozen=True)
class ScheduleConfig:
    kind: str = "cosine"  # after linear warmup: "cosine" | "linear" decay to final_fraction, or "constant"
    learning_rate: float = 1e-4  # peak learning rate of parameters in no lr_group
    warmup_steps: int = 0
    final_fraction: float = 0.1  # end of decay as a fraction of the peak


@dataclass(frozen=True)
class OptimizerConfig:
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # decoupled (AdamW), scaled by the learning rate
    no_decay: tuple[str, ...] = NO_DECAY_DEFAULT  # regexes (full match) exempt from weight decay
    clip_norm: float = 1.0  # global gradient-norm clipping; 0 disables
    lr_groups: tuple[LrGroup, ...] = ()


@dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 500
    max_to_keep: int = 3  # most recent committed steps kept
    keep_every: int = 0  # additionally keep every K-th step forever; 0 = none
    async_save: bool = True


@dataclass(frozen=True)
class LogConfig:
    every_steps: int = 10
    tensorboard: bool = True


@dataclass(frozen=True)
class SyntheticDataConfig:
    """In-memory batches with the training batch structure; stands in until the Grain pipeline is mounted."""
    seq_len: int = 32
    num_images: int = 1
    num_tiles: int = 1  # tiles per image: the "resolution" knob of a tiled encoder
    delay_s: float = 0.0  # emulated input latency per batch (benchmarks; lets tests kill a run mid-flight)


@dataclass(frozen=True)
class StageConfig:
    """One recipe stage; fields left unset inherit the `train:` values."""
    name: str = ""
    steps: int = 0
    trainable: tuple[str, ...] | None = None
    frozen: tuple[str, ...] | None = None
    schedule: ScheduleConfig | None = None
    lr_groups: tuple[LrGroup, ...] | None = None
    reset_optimizer: bool = False  # fresh optimizer state (always the case when the trainable set changes)
    synthetic: SyntheticDataConfig | None = None
    data: Any = None  # data-mix overrides for this stage, read by the data pipeline


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 0  # single-stage runs: total steps (> 0). Recipes: stop at this global step (0 = all stages)
    batch_size: int = 8  # global batch
    microbatches: int = 1  # gradient accumulation: the batch is split into this many sequential microbatches
    trainable: tuple[str, ...] = (".*",)  # regexes (full match) over parameter paths
    frozen: tuple[str, ...] = ()  # regexes subtracted from `trainable`
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    loss_chunk: int = 256  # sequence positions per cross-entropy chunk (bounds the logits held at once)
    z_loss: float = 0.0  # weight of mean(logsumexp^2)
    max_nonfinite_steps: int = 5  # consecutive NaN/Inf steps (each skipped) before stopping
    eval_every: int = 0  # 0 disables
    eval_batches: int = 2
    # Pipeline runs: also greedy-answer this many records of each data.eval_sources entry at every eval and log
    # exact-match accuracy as eval_accuracy/<name>/<split> (0 = loss only). Needs a cross-attention model.
    eval_examples: int = 0
    peak_flops_per_device: float = 0.0  # for MFU; 0 = look up by device kind (CPU: a nominal number)
    checkpoint: CheckpointConfig = CheckpointConfig()
    log: LogConfig = LogConfig()
    synthetic: SyntheticDataConfig = SyntheticDataConfig()
    stages: tuple[StageConfig, ...] = ()

@dataclass(frozen=True)
class DistributedConfig:
    """Multi-process runtime. "auto" initialises jax.distributed when the environment says there are several
    processes (TPU VM pod workers, a SLURM job with several tasks); "explicit" uses the fields below."""
    mode: str = "auto"  # "auto" | "explicit" | "off"
    coordinator_address: str = ""  # host:port of process 0 (explicit mode)
    num_processes: int = 1
    process_id: int = 0
    initialization_timeout_s: int = 300


# -------------------------------------------------------------------------------------------- root


@dataclass(frozen=True)
class Config:
    model: ModelConfig = ModelConfig()
    mesh: MeshConfig = MeshConfig()
    distributed: DistributedConfig = DistributedConfig()
    train: TrainConfig = TrainConfig()
    # Input pipeline. `data.sources` empty (the default) = synthetic batches (train.synthetic, train.batch_size).
    # With sources, training reads the Grain pipeline and the GLOBAL batch is data.shapes.batch_size (rows per
    # process) x the process count, of data.shapes.seq_len tokens; train.batch_size and train.synthetic are then
    # not used (train.microbatches must divide the global batch). Stages whose `data` is a mapping deep-merge it
    # into this section for that stage. data.tokenizer "" with embedded sources: a sentencepiece tokenizer is
    # trained once on the embedded tasks' texts and kept as <workdir>/tokenizer.model.
    data: DataConfig = DataConfig(sources=())
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
    if cls is Config and isinstance(data.get("data"), dict) and "sources" not in data["data"]:
        data["data"] = {**data["data"], "sources": []}  # the root default: no sources (synthetic batches)
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


FAMILIES = ("mllama", "llava", "idefics3", "clip", "siglip")
UNIFIED_FAMILIES = ("llava", "idefics3")
CONTRASTIVE_FAMILIES = ("clip", "siglip")
_VIT_KINDS = ("clip", "siglip")
_ACTIVATIONS = ("gelu", "gelu_pytorch_tanh", "quick_gelu")
_CONNECTORS = ("mlp", "pixel_shuffle", "perceiver", "dual_mlp")


def _validate_vit(v: ViTConfig, where: str):
    _check(v.kind in _VIT_KINDS, f"{where}.kind: '{v.kind}' is not one of {_VIT_KINDS}")
    _check(v.hidden_act in _ACTIVATIONS, f"{where}.hidden_act: '{v.hidden_act}' is not one of {_ACTIVATIONS}")
    for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "patch_size", "image_size"):
        _check(getattr(v, name) > 0, f"{where}.{name} must be positive, got {getattr(v, name)}")
    _check(v.hidden_size % v.num_heads == 0, f"{where}.num_heads ({v.num_heads}) must divide hidden_size")
    _check(v.image_size % v.patch_size == 0, f"{where}.patch_size ({v.patch_size}) must divide image_size")


def _validate_unified(m: ModelConfig):
    c = m.connector
    _check(m.vit is not None, f"model.vit must be set for family '{m.family}'")
    _validate_vit(m.vit, "model.vit")
    _check(not m.text.cross_attention_layers,
           f"model.text.cross_attention_layers must be [] for family '{m.family}' (image tokens are embedded)")
    _check(c.kind in _CONNECTORS, f"model.connector.kind: '{c.kind}' is not one of {_CONNECTORS}")
    _check(c.feature_strategy in ("default", "full"),
           f"model.connector.feature_strategy: '{c.feature_strategy}' is not 'default' or 'full'")
    _check(c.hidden_act in _ACTIVATIONS, f"model.connector.hidden_act: '{c.hidden_act}' is not one of {_ACTIVATIONS}")
    for i in c.feature_layers:
        _check(-m.vit.num_layers - 1 <= i <= m.vit.num_layers,
               f"model.connector.feature_layers: {i} is out of range for {m.vit.num_layers} layers")
    if c.kind == "pixel_shuffle":
        side = m.vit.patches_per_side
        _check(c.scale_factor > 0 and side % c.scale_factor == 0 and not m.vit.class_token,
               f"model.connector.scale_factor ({c.scale_factor}) must divide the {side}x{side} patch grid "
               "of a tower without a class token")
    if c.kind == "dual_mlp":
        _check(m.ocr_vit is not None, "model.ocr_vit must be set for connector 'dual_mlp'")
        _validate_vit(m.ocr_vit, "model.ocr_vit")
        _check((m.ocr_vit.hidden_size, m.ocr_vit.num_tokens) == (m.vit.hidden_size, m.vit.num_tokens),
               "model.ocr_vit must give as many tokens of the same width as model.vit (features are averaged)")
    if c.kind == "perceiver":
        _check(c.num_latents > 0 and m.text.hidden_size % c.num_heads == 0,
               f"model.connector: num_latents must be positive and num_heads ({c.num_heads}) must divide "
               f"model.text.hidden_size ({m.text.hidden_size})")


def _validate_contrastive(m: ModelConfig):
    e = m.text_encoder
    _check(m.vit is not None and e is not None, f"model.vit and model.text_encoder must be set for '{m.family}'")
    _validate_vit(m.vit, "model.vit")
    _check(m.vit.kind == m.family, f"model.vit.kind must be '{m.family}' for family '{m.family}'")
    _check(e.hidden_act in _ACTIVATIONS, f"model.text_encoder.hidden_act: '{e.hidden_act}' is not one of {_ACTIVATIONS}")
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                 "max_position_embeddings", "projection_dim"):
        _check(getattr(e, name) > 0, f"model.text_encoder.{name} must be positive, got {getattr(e, name)}")
    _check(e.hidden_size % e.num_heads == 0, f"model.text_encoder.num_heads ({e.num_heads}) must divide hidden_size")


def validate_model(m: ModelConfig):
    v, t = m.vision, m.text
    _check(m.family in FAMILIES, f"model.family: '{m.family}' is not supported; use one of {', '.join(FAMILIES)}")
    if m.family in UNIFIED_FAMILIES:
        _validate_unified(m)
    if m.family in CONTRASTIVE_FAMILIES:
        _validate_contrastive(m)
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
    rows = t.vocab_size + t.extra_embeddings
    _check(t.extra_embeddings >= 0, f"model.text.extra_embeddings must be >= 0, got {t.extra_embeddings}")
    _check(0 <= m.image_token_index < rows, f"model.image_token_index ({m.image_token_index}) must index the "
           f"embedding table (vocab_size + extra_embeddings = {rows} rows)")


def validate(cfg: Config):
    validate_model(cfg.model)
    for axis in ("data", "fsdp", "tensor"):
        n = getattr(cfg.mesh, axis)
        _check(n == -1 or n > 0, f"mesh.{axis} must be positive or -1 (auto), got {n}")
    d = cfg.distributed
    _check(d.mode in ("auto", "explicit", "off"), f"distributed.mode: '{d.mode}' is not auto, explicit or off")
    if d.mode == "explicit":
        _check(":" in d.coordinator_address, "distributed.coordinator_address must be host:port in explicit mode")
        _check(0 <= d.process_id < d.num_processes,
               f"distributed.process_id ({d.process_id}) must be in [0, num_processes={d.num_processes})")
    validate_train(cfg.train)
    if cfg.data.sources:
        validate_data(cfg.data)
        for i, stage in enumerate(cfg.train.stages):
            stage_data_config(cfg.data, stage.data, f"train.stages[{i}].data")


def stage_data_config(data: DataConfig, overrides: Any, where: str = "stage data") -> DataConfig:
    """`data` with a stage's overrides deep-merged in (when they are a mapping; anything else is ignored),
    strictly parsed and validated."""
    if not isinstance(overrides, dict) or not overrides:
        return data
    merged = from_dict(DataConfig, deep_merge(to_dict(data), overrides), where)
    validate_data(merged, where)
    return merged


_SCHEDULES = ("cosine", "linear", "constant")


def _check_regexes(patterns, where: str):
    import re
    for p in patterns:
        try:
            re.compile(p)
        except re.error as e:
            raise ConfigError(f"{where}: '{p}' is not a valid regex ({e})") from None


def _validate_schedule(s: ScheduleConfig, where: str):
    _check(s.kind in _SCHEDULES, f"{where}.kind: '{s.kind}' is not one of {_SCHEDULES}")
    _check(s.learning_rate >= 0, f"{where}.learning_rate must be >= 0, got {s.learning_rate}")
    _check(s.warmup_steps >= 0, f"{where}.warmup_steps must be >= 0, got {s.warmup_steps}")
    _check(0 <= s.final_fraction <= 1, f"{where}.final_fraction must be in [0, 1], got {s.final_fraction}")


def validate_train(t: TrainConfig):
    _check(t.steps >= 0, f"train.steps must be >= 0, got {t.steps}")  # > 0 without stages: checked by `train`
    _check(t.batch_size > 0, f"train.batch_size must be positive, got {t.batch_size}")
    _check(t.microbatches > 0 and t.batch_size % t.microbatches == 0,
           f"train.microbatches ({t.microbatches}) must divide train.batch_size ({t.batch_size})")
    _check(t.loss_chunk > 0, f"train.loss_chunk must be positive, got {t.loss_chunk}")
    _check(t.eval_examples >= 0, f"train.eval_examples must be >= 0, got {t.eval_examples}")
    _check(t.max_nonfinite_steps > 0, f"train.max_nonfinite_steps must be positive, got {t.max_nonfinite_steps}")
    _check(t.checkpoint.every_steps > 0, f"train.checkpoint.every_steps must be positive, got {t.checkpoint.every_steps}")
    _check(t.checkpoint.max_to_keep > 0, f"train.checkpoint.max_to_keep must be positive, got {t.checkpoint.max_to_keep}")
    _check(t.log.every_steps > 0, f"train.log.every_steps must be positive, got {t.log.every_steps}")
    _check(t.synthetic.seq_len > 1, f"train.synthetic.seq_len must be > 1, got {t.synthetic.seq_len}")
    _validate_schedule(t.schedule, "train.schedule")
    _check_regexes(t.trainable + t.frozen + t.optimizer.no_decay, "train")
    _check_regexes([g.pattern for g in t.optimizer.lr_groups], "train.optimizer.lr_groups")
    for i, st in enumerate(t.stages):
        where = f"train.stages[{i}]"
        _check(st.steps > 0, f"{where}.steps must be positive, got {st.steps}")
        if st.schedule is not None:
            _validate_schedule(st.schedule, f"{where}.schedule")
        _check_regexes((st.trainable or ()) + (st.frozen or ()), where)
        _check_regexes([g.pattern for g in st.lr_groups or ()], f"{where}.lr_groups")
