"""CLIP and SigLIP ViTs as one module (hf_layouts.md B, C): `ViTConfig.kind` picks class token + pre-layernorm
(CLIP) or patch bias + attention-pooling head (SigLIP). Every layer's output is kept for feature selection."""
from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from vlm_jax.config import ModelConfig, ViTConfig
from vlm_jax.models.layers import (EncoderSpec, GeluMLP, LayerNorm, Linear, constrain, dot_product_attention,
                                   dtype_of, param)
from vlm_jax.models.vision import encoder_stack


class ViTOutput(NamedTuple):
    hidden_states: jnp.ndarray  # (L+1, B, N, H): embeddings (after CLIP's pre-layernorm), then each layer's output
    last_hidden_state: jnp.ndarray  # (B, N, H) after post_layernorm
    pooled: jnp.ndarray | None  # (B, H): CLIP's class token, SigLIP's attention-pooling head, or None


def vit_encoder_spec(v: ViTConfig) -> EncoderSpec:
    return EncoderSpec(v.hidden_size, v.num_heads, v.intermediate_size, v.norm_eps, v.hidden_act,
                       attention_bias=True)


def bucketed_position_ids(patch_mask, side: int):
    """Idefics3's position ids for a partly valid patch grid: each axis's valid patches are spread over the
    full `side` of the position table, floor-bucketed exactly as transformers does (float32, right-closed).

    patch_mask: (B, h, w) bool. Returns (B, h*w) int32; invalid patches get 0."""
    b, h, w = patch_mask.shape
    # torch.arange(1/side, 1, 1/side) accumulates in float64 and rounds once to float32.
    boundaries = jnp.asarray(np.arange(1 / side, 1.0, 1 / side).astype(np.float32))

    def buckets(valid_count, n):
        step = 1.0 / jnp.maximum(valid_count, 1).astype(jnp.float32)
        frac = jnp.minimum(jnp.arange(n, dtype=jnp.float32)[None, :] * step[:, None], 1.0 - 1e-6)
        return jnp.searchsorted(boundaries, frac, side="right")

    rows = buckets(patch_mask[:, :, 0].sum(axis=1), h)
    cols = buckets(patch_mask[:, 0, :].sum(axis=1), w)
    ids = (rows[:, :, None] * side + cols[:, None, :]).reshape(b, h * w)
    return jnp.where(patch_mask.reshape(b, -1), ids, 0).astype(jnp.int32)


class AttentionPoolingHead(nn.Module):
    """SigLIP's head: a learned probe attends over the tokens (torch MultiheadAttention with a fused input
    projection), then a residual MLP."""
    vit: ViTConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        v, kw = self.vit, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        probe = param(self, "probe", nn.initializers.normal(1.0), (1, 1, v.hidden_size), (None, None, "vision_embed"),
                      self.param_dtype)
        in_proj = Linear((3, v.num_heads, v.head_dim), ("vision_embed", None, "vision_heads", "head_dim"),
                         use_bias=True, name="in_proj", **kw)
        q = in_proj(jnp.broadcast_to(probe.astype(x.dtype), (x.shape[0], 1, v.hidden_size)))[:, :, 0]
        kv = in_proj(x)
        h = dot_product_attention(q, kv[:, :, 1], kv[:, :, 2], None)
        h = Linear(v.hidden_size, ("vision_heads", "head_dim", "vision_embed"), use_bias=True, contract_dims=2,
                   name="out_proj", **kw)(h)
        h = h + GeluMLP(v.intermediate_size, activation=v.hidden_act, name="mlp", **kw)(
            LayerNorm("vision_embed", v.norm_eps, name="layernorm", **kw)(h))
        return h[:, 0]


class ViT(nn.Module):
    config: ModelConfig
    vit: ViTConfig

    @nn.compact
    def __call__(self, pixel_values, patch_mask=None) -> ViTOutput:
        """pixel_values (B, C, H, W) at the configured image_size; patch_mask (B, h, w) bool marks valid
        patches (Idefics3: bucketed positions and attention to valid patches only), None = all valid."""
        cfg, v = self.config, self.vit
        dtype, pdtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        kw = dict(dtype=dtype, param_dtype=pdtype)
        b = pixel_values.shape[0]
        pixels = constrain(jnp.transpose(pixel_values, (0, 2, 3, 1)).astype(dtype),
                           ("vision_batch", None, None, None))
        x = nn.Conv(v.hidden_size, (v.patch_size, v.patch_size), strides=v.patch_size, padding="VALID",
                    use_bias=not v.class_token, name="patch_embedding",
                    kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                             (None, None, None, "vision_embed")),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("vision_embed",)), **kw)(pixels)
        x = x.reshape(b, -1, v.hidden_size)
        table = param(self, "position_embedding", nn.initializers.normal(0.02), (v.num_tokens, v.hidden_size),
                      (None, "vision_embed"), pdtype).astype(dtype)
        if v.class_token:
            cls = param(self, "class_embedding", nn.initializers.normal(0.02), (v.hidden_size,), ("vision_embed",),
                        pdtype)
            x = jnp.concatenate([jnp.broadcast_to(cls.astype(dtype), (b, 1, v.hidden_size)), x], axis=1)
        if patch_mask is None:
            x = x + table
            mask = None
        else:
            x = x + table[bucketed_position_ids(patch_mask, v.patches_per_side)]
            mask = patch_mask.reshape(b, 1, 1, -1)  # keys only: every query sees the valid patches
        if v.class_token:
            x = LayerNorm("vision_embed", v.norm_eps, name="pre_layernorm", **kw)(x)
        x = constrain(x, ("vision_batch", "vision_length", "act_embed"))
        last, per_layer = encoder_stack(cfg, "encoder", vit_encoder_spec(v), v.num_layers, emit="output")(x, mask)
        hidden_states = jnp.concatenate([x[None], per_layer], axis=0)
        final = LayerNorm("vision_embed", v.norm_eps, name="post_layernorm", **kw)(last)
        if v.class_token:
            pooled = final[:, 0]
        elif v.pooling_head:
            pooled = AttentionPoolingHead(v, name="head", **kw)(final)
        else:
            pooled = None
        return ViTOutput(hidden_states, final, pooled)
