"""The `model:` section: one dataclass per architectural part; a family reads the parts it needs.

Validation: `validate_model` checks what every family shares (dtypes, remat, attention) and hands the rest to
the family (`Family.validate`), which calls the section validators below for the sections it reads.
"""
from __future__ import annotations

from dataclasses import dataclass

from vlm_jax.config.loader import check, from_dict
from vlm_jax.registry import FAMILIES

DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
ACTIVATIONS = ("gelu", "gelu_pytorch_tanh", "quick_gelu")
VIT_KINDS = ("clip", "siglip")


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
    # "input": index i is the state entering local layer i: Meta's reference encoder and transformers 4.x (4.46.3
    # checked), so what every Llama 3.2 Vision checkpoint was trained with. "output": index i is local layer i's
    # output, how transformers 5.x reads the same config.json field (`vlm-jax export` translates: convert/mllama.py).
    intermediate_layers_convention: str = "input"
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
    family: str = "mllama"  # a registered family (vlm_jax/families/): it says which sections below it reads
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
    # The vision towers' own policy ("" = remat_policy). With many tiles per sequence the encoder's activations can
    # outweigh the decoder's, so a large run may recompute the towers fully while the decoder keeps its matmuls.
    vision_remat_policy: str = ""
    # "xla": einsum attention with a dense mask (every platform). "splash": JAX's Pallas TPU splash attention;
    # "cudnn": cuDNN flash attention via jax.nn.dot_product_attention (GPU; unpacked rows only). "auto": splash
    # on TPU, cudnn on GPU (xla when data.packing is on), xla on CPU, announced. A kernel runs the decoder's causal
    # self-attention over whole sequences; cross-attention, vision towers and cached decoding stay on xla.
    attention_impl: str = "xla"
    # A reward model: a scalar head (text/reward_head, hidden -> 1) on the final hidden states, trained by
    # `train.objective: reward` and read by `vlm-jax score`. Generative families only; not exported to HF.
    reward_head: bool = False


ATTENTION_IMPLS = ("xla", "splash", "cudnn", "auto")


def vision_remat(m: ModelConfig) -> str:
    """The remat policy of the vision towers."""
    return m.vision_remat_policy or m.remat_policy


def validate_model(m: ModelConfig):
    family = FAMILIES.get(m.family, "model.family")
    check(m.dtype in DTYPES, f"model.dtype: '{m.dtype}' is not one of {DTYPES}")
    check(m.param_dtype in DTYPES, f"model.param_dtype: '{m.param_dtype}' is not one of {DTYPES}")
    check(m.remat_policy in REMAT_POLICIES, f"model.remat_policy: '{m.remat_policy}' is not one of {REMAT_POLICIES}")
    check(m.vision_remat_policy in ("", *REMAT_POLICIES),
          f"model.vision_remat_policy: '{m.vision_remat_policy}' is not one of {REMAT_POLICIES} (or \"\" for "
          "model.remat_policy)")
    check(m.attention_impl in ATTENTION_IMPLS,
          f"model.attention_impl: '{m.attention_impl}' is not one of {ATTENTION_IMPLS}")
    family.validate(m)


def load_model_config(data: dict) -> ModelConfig:
    """A validated ModelConfig from a plain mapping (what the HF converters build)."""
    cfg = from_dict(ModelConfig, data, "model")
    validate_model(cfg)
    return cfg


def positive(section, names, where: str):
    for name in names:
        check(getattr(section, name) > 0, f"{where}.{name} must be positive, got {getattr(section, name)}")


def validate_vit(v: ViTConfig, where: str):
    check(v.kind in VIT_KINDS, f"{where}.kind: '{v.kind}' is not one of {VIT_KINDS}")
    check(v.hidden_act in ACTIVATIONS, f"{where}.hidden_act: '{v.hidden_act}' is not one of {ACTIVATIONS}")
    positive(v, ("hidden_size", "intermediate_size", "num_layers", "num_heads", "patch_size", "image_size"), where)
    check(v.hidden_size % v.num_heads == 0, f"{where}.num_heads ({v.num_heads}) must divide hidden_size")
    check(v.image_size % v.patch_size == 0, f"{where}.patch_size ({v.patch_size}) must divide image_size")


def validate_mllama_vision(v: MllamaVisionConfig):
    positive(v, ("hidden_size", "intermediate_size", "num_heads", "patch_size", "image_size", "max_num_tiles",
                 "num_channels"), "model.vision")
    check(v.hidden_size % v.num_heads == 0,
          f"model.vision.num_heads ({v.num_heads}) must divide model.vision.hidden_size ({v.hidden_size})")
    check(v.image_size % v.patch_size == 0,
          f"model.vision.patch_size ({v.patch_size}) must divide model.vision.image_size ({v.image_size})")
    check(v.intermediate_layers_convention in ("output", "input"),
          "model.vision.intermediate_layers_convention must be 'output' or 'input'")
    for i in v.intermediate_layers_indices:
        check(0 <= i < v.num_layers,
              f"model.vision.intermediate_layers_indices: {i} is out of range for {v.num_layers} local layers")
    for a, b in v.supported_aspect_ratios:
        check(1 <= a * b <= v.max_num_tiles,
              f"model.vision.supported_aspect_ratios: ({a}, {b}) needs more than max_num_tiles={v.max_num_tiles}")


def validate_text(m: ModelConfig):
    """The Llama decoder (`model.text`) and the image token's row in its embedding table."""
    t = m.text
    positive(t, ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"),
             "model.text")
    check(t.hidden_size % t.num_heads == 0,
          f"model.text.num_heads ({t.num_heads}) must divide model.text.hidden_size ({t.hidden_size})")
    check(t.num_heads % t.num_kv_heads == 0,
          f"model.text.num_kv_heads ({t.num_kv_heads}) must divide model.text.num_heads ({t.num_heads})")
    check(t.head_dim % 2 == 0, f"model.text head_dim ({t.head_dim}) must be even for RoPE")
    xs = t.cross_attention_layers
    check(list(xs) == sorted(set(xs)), f"model.text.cross_attention_layers must be strictly increasing, got {list(xs)}")
    for i in xs:
        check(0 <= i < t.num_layers,
              f"model.text.cross_attention_layers: {i} is out of range for num_layers={t.num_layers}")
    check(not m.scan_layers or t.is_periodic,
          f"model.text.cross_attention_layers {list(xs)} are not evenly spaced over {t.num_layers} layers, "
          "so the stack cannot be scanned; set model.scan_layers=false")
    if t.rope_scaling is not None:
        check(t.rope_scaling.rope_type in ("llama3", "default"),
              f"model.text.rope_scaling.rope_type: '{t.rope_scaling.rope_type}' is not 'llama3' or 'default'")
    rows = t.vocab_size + t.extra_embeddings
    check(t.extra_embeddings >= 0, f"model.text.extra_embeddings must be >= 0, got {t.extra_embeddings}")
    check(0 <= m.image_token_index < rows, f"model.image_token_index ({m.image_token_index}) must index the "
          f"embedding table (vocab_size + extra_embeddings = {rows} rows)")


def validate_text_encoder(e: TextEncoderConfig):
    check(e.hidden_act in ACTIVATIONS, f"model.text_encoder.hidden_act: '{e.hidden_act}' is not one of {ACTIVATIONS}")
    positive(e, ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                 "max_position_embeddings", "projection_dim"), "model.text_encoder")
    check(e.hidden_size % e.num_heads == 0, f"model.text_encoder.num_heads ({e.num_heads}) must divide hidden_size")
