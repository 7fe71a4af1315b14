"""Mllama tiled ViT: per-tile patches, aspect-ratio (tile) embeddings, local layers with intermediate
features, gated global layers. Semantics follow transformers' MllamaVisionModel (hf_layouts.md A2)."""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from vlm_jax.config import ModelConfig
from vlm_jax.config.model import vision_remat
from vlm_jax.models.layers import (EncoderLayer, EncoderSpec, LayerNorm, constrain, dtype_of, param,
                                   stack_layers)

# HF applies layernorm_pre/post with the LayerNorm default eps, not config.norm_eps.
_PRE_POST_EPS = 1e-5


def mllama_encoder_spec(cfg: ModelConfig) -> EncoderSpec:
    v = cfg.vision
    return EncoderSpec(v.hidden_size, v.num_heads, v.intermediate_size, v.norm_eps)


def encoder_stack(cfg: ModelConfig, name: str, spec: EncoderSpec, length: int, vision: bool = True,
                  **layer_kwargs):
    """`length` scanned (or unrolled) EncoderLayers with the model's dtypes, remat (a vision tower's own, or the
    model's for a text encoder) and attention kernel."""
    stack = stack_layers(EncoderLayer, length=length, layers_axis=spec.layers_axis,
                         remat_policy=vision_remat(cfg) if vision else cfg.remat_policy, scan=cfg.scan_layers)
    return stack(name, spec=spec, dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype),
                 attention_impl=cfg.attention_impl, **layer_kwargs)


def tile_attention_mask(aspect_ratio_mask, num_patches: int, padded: int):
    """Only padding-query x padding-key pairs are masked; real tokens do see padded patches and tiles.

    aspect_ratio_mask: (B*N, T) -> bool (B*N, 1, T*padded, T*padded), True = attend."""
    valid_tile = aspect_ratio_mask.astype(bool)[:, :, None]
    valid = valid_tile & (jnp.arange(padded) < num_patches)[None, None, :]
    pad = ~valid.reshape(valid.shape[0], -1)
    return ~(pad[:, :, None] & pad[:, None, :])[:, None]


class MllamaVisionEncoder(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, pixel_values, aspect_ratio_ids, aspect_ratio_mask):
        """pixel_values (B, N, T, C, H, W); aspect_ratio_ids (B, N); aspect_ratio_mask (B, N, T).
        Returns (B, N, T, P, hidden * (1 + K)) with the K intermediate features interleaved."""
        cfg, v = self.config, self.config.vision
        dtype, pdtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        b, n, t, c, hgt, wid = pixel_values.shape
        hv, p, num_ar = v.hidden_size, v.num_patches, len(v.supported_aspect_ratios) + 1
        ar_ids = aspect_ratio_ids.reshape(b * n)

        pixels = jnp.transpose(pixel_values.reshape(b * n * t, c, hgt, wid), (0, 2, 3, 1)).astype(dtype)
        pixels = constrain(pixels, ("vision_batch", None, None, None))
        x = nn.Conv(hv, (v.patch_size, v.patch_size), strides=v.patch_size, padding="VALID", use_bias=False,
                    dtype=dtype, param_dtype=pdtype, name="patch_embedding",
                    kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                             (None, None, None, "vision_embed")))(pixels)
        x = x.reshape(b * n, t, p - 1, hv)

        def gate(name):
            return jnp.tanh(param(self, name, nn.initializers.zeros, (1,), (None,), pdtype)).astype(dtype)

        def tile_embedding(name, shape, axes):
            table = param(self, name, nn.initializers.normal(0.02), (num_ar, *shape), (None, *axes), pdtype)
            return table[ar_ids].astype(dtype)

        x = x + tile_embedding("pre_tile_embedding", (t, 1, hv), (None, None, "vision_embed")) * gate(
            "pre_tile_gate")
        cls = param(self, "class_embedding", nn.initializers.normal(hv ** -0.5), (hv,), ("vision_embed",), pdtype)
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(dtype), (b * n, t, 1, hv)), x], axis=2)
        pos = param(self, "position_embedding", nn.initializers.normal(hv ** -0.5), (p, hv),
                    (None, "vision_embed"), pdtype)
        pos_gate = gate("position_gate")
        x = x + (1 - pos_gate) * pos.astype(dtype)
        x = x + pos_gate * tile_embedding("tile_position_embedding", (t, p, hv), (None, None, "vision_embed"))
        x = LayerNorm("vision_embed", _PRE_POST_EPS, dtype, pdtype, name="layernorm_pre")(x)

        padded = v.padded_num_patches
        x = jnp.pad(x, ((0, 0), (0, 0), (0, padded - p), (0, 0))).reshape(b * n, t * padded, hv)
        x = constrain(x, ("vision_batch", "vision_length", "act_embed"))
        mask = tile_attention_mask(aspect_ratio_mask.reshape(b * n, t), p, padded)

        spec = mllama_encoder_spec(cfg)
        local = encoder_stack(cfg, "transformer", spec, v.num_layers, emit=v.intermediate_layers_convention)
        x, per_layer = local(x, mask)
        # Selected states interleaved on channels: stack on a new last axis, then flatten (channel d*K + k).
        inter = jnp.stack([per_layer[i] for i in v.intermediate_layers_indices], axis=-1)
        inter = inter.reshape(b * n, t, padded, hv * len(v.intermediate_layers_indices))[:, :, :p]

        x = LayerNorm("vision_embed", _PRE_POST_EPS, dtype, pdtype, name="layernorm_post")(x)
        x = x.reshape(b * n, t, padded, hv)
        x = x + tile_embedding("post_tile_embedding", (t, 1, hv), (None, None, "vision_embed")) * gate(
            "post_tile_gate")
        glob = encoder_stack(cfg, "global_transformer", spec, v.num_global_layers, gated=True)
        x, _ = glob(x.reshape(b * n, t * padded, hv), mask)
        x = x.reshape(b * n, t, padded, hv)[:, :, :p]
        out = jnp.concatenate([x, inter.astype(x.dtype)], axis=-1)
        return out.reshape(b, n, t, p, v.output_dim)
