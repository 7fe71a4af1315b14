"""Forward FLOPs of the shared building blocks (2 per multiply-accumulate of every matmul, attention scores and
values included; causal self-attention counts half its square). Families add theirs up per component."""
from __future__ import annotations

from vlm_jax.config import TextConfig, TextEncoderConfig, ViTConfig


def text_flops(t: TextConfig, s: int, cross_tokens: int = 0) -> float:
    """The Llama decoder on `s` tokens; its cross-attention layers attend to `cross_tokens` vision tokens."""
    hid, hd = t.hidden_size, t.head_dim
    q_o = 2 * s * hid * t.num_heads * hd * 2
    mlp = 2 * s * 3 * hid * t.intermediate_size
    self_layer = q_o + 2 * s * hid * t.num_kv_heads * hd * 2 + mlp + 4 * s * s * t.num_heads * hd / 2
    cross_layer = (q_o + 2 * cross_tokens * hid * t.num_kv_heads * hd * 2 + mlp
                   + 4 * s * cross_tokens * t.num_heads * hd)
    n_cross = len(t.cross_attention_layers)
    return float((t.num_layers - n_cross) * self_layer + n_cross * cross_layer + 2 * s * hid * t.vocab_size)


def vit_flops(v: ViTConfig, images: int) -> float:
    """A CLIP/SigLIP tower on `images` images. The scanned stack runs every layer, even past the feature layer
    (LLaVA's -2); the pooled output is unused by the unified models, so XLA drops SigLIP's pooling head."""
    n, h = v.num_tokens, v.hidden_size
    layer = 2 * n * (4 * h * h + 2 * h * v.intermediate_size) + 4 * n * n * h
    return float(images * (2 * v.patches_per_side ** 2 * v.num_channels * v.patch_size ** 2 * h + v.num_layers * layer))


def text_encoder_flops(e: TextEncoderConfig, s: int) -> float:
    """A bidirectional (or causal, same count) text encoder on `s` tokens."""
    layer = 2 * s * (4 * e.hidden_size ** 2 + 2 * e.hidden_size * e.intermediate_size) + 4 * s * s * e.hidden_size
    return float(e.num_layers * layer)
