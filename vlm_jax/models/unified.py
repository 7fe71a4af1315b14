"""Unified-embedding VLMs (LLaVA, Idefics3, POINTS-style): image features replace the `<image>` token
embeddings of the shared Llama decoder (hf_layouts.md B, C).

Shapes are static under jit: every image slot is encoded, and the k-th `<image>` token in row-major
(batch, sequence) order takes the k-th feature row of the real images in order, so padding slots are skipped
without dynamic shapes. The data pipeline guarantees the counts agree: it expands each `<image>` to
`tokens_per_image` tokens (the family's input spec), and `encode_images` checks the connector returns that many.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from vlm_jax.config import ModelConfig
from vlm_jax.registry import CONNECTORS
from vlm_jax.models.connectors import build_connector
from vlm_jax.models.layers import constrain
from vlm_jax.models.text import DecoderInputs, TextDecoder, packing_defaults
from vlm_jax.models.vit import ViT, ViTOutput


def feature_tokens(cfg: ModelConfig) -> int:
    """Tower tokens per image that reach the connector (`select_features`)."""
    c = cfg.connector
    return cfg.vit.num_tokens - int(bool(c.feature_layers) and c.feature_strategy == "default")


def tokens_per_image(cfg: ModelConfig) -> int:
    """`<image>` tokens the data pipeline must emit per image."""
    return CONNECTORS.get(cfg.connector.kind).tokens_per_image(cfg, feature_tokens(cfg))


def select_features(out: ViTOutput, cfg: ModelConfig):
    """LLaVA's `vision_feature_layer` (one index or several, concatenated on channels) and strategy
    ("default" drops token 0, as transformers does whatever the tower); no layers = Idefics3's final output."""
    c = cfg.connector
    if not c.feature_layers:
        return out.last_hidden_state
    x = jnp.concatenate([out.hidden_states[i] for i in c.feature_layers], axis=-1)
    return x[:, 1:] if c.feature_strategy == "default" else x


def scatter_into_tokens(image_tokens, is_real, is_image_token):
    """image_tokens (B, N, T, H) for every slot; is_real (B, N); is_image_token (B, S).
    Returns (B, S, H): at the k-th image token (row-major), the k-th token of the real images in order."""
    b, n, t, h = image_tokens.shape
    rows = image_tokens.reshape(b * n * t, h)
    real_rows = jnp.nonzero(jnp.repeat(is_real.reshape(-1), t), size=b * n * t, fill_value=0)[0]
    k = jnp.cumsum(is_image_token.reshape(-1)) - 1
    picked = rows[real_rows[jnp.clip(k, 0, b * n * t - 1)]]
    return picked.reshape(*is_image_token.shape, h)


def patch_mask_of(pixel_attention_mask, patch: int):
    """(M, H, W) pixel validity -> (M, H/p, W/p): a patch is valid if any of its pixels is."""
    m, hgt, wid = pixel_attention_mask.shape
    grid = pixel_attention_mask.astype(bool).reshape(m, hgt // patch, patch, wid // patch, patch)
    return grid.any(axis=(2, 4))


class UnifiedVLM(nn.Module):
    config: ModelConfig
    decode: bool = False

    def setup(self):
        cfg = self.config
        self.vision = ViT(cfg, cfg.vit)
        if cfg.ocr_vit is not None:
            self.ocr_vision = ViT(cfg, cfg.ocr_vit)
        self.connector = build_connector(cfg)
        self.text = TextDecoder(cfg, decode=self.decode)

    def encode_images(self, pixel_values, pixel_attention_mask=None):
        """pixel_values (B, N, C, H, W) -> (B, N, T, text hidden) for every slot, padding ones included."""
        cfg = self.config
        b, n = pixel_values.shape[:2]
        pixels = pixel_values.reshape(b * n, *pixel_values.shape[2:])
        patch_mask = None
        if pixel_attention_mask is not None:
            patch_mask = patch_mask_of(pixel_attention_mask.reshape(b * n, *pixels.shape[2:]), cfg.vit.patch_size)
        towers = [self.vision] + ([self.ocr_vision] if cfg.ocr_vit is not None else [])
        features = [select_features(tower(pixels, patch_mask), cfg) for tower in towers]
        tokens = self.connector(features)
        if tokens.shape[1] != tokens_per_image(cfg):  # static: fails at trace time, before any mis-scatter
            raise ValueError(f"connector '{cfg.connector.kind}' returns {tokens.shape[1]} tokens per image but "
                             f"tokens_per_image() says {tokens_per_image(cfg)}, which the data pipeline expands "
                             "each <image> to; fix the connector's tokens_per_image")
        return constrain(tokens.reshape(b, n, *tokens.shape[1:]), ("batch", None, "vision_length", "act_embed"))

    def __call__(self, input_ids, pixel_values=None, pixel_attention_mask=None, image_mask=None,
                 segment_ids=None, positions=None, return_hidden: bool = False):
        """input_ids (B, S); pixel_values (B, N, C, H, W), N static image slots per row; image_mask (B, N)
        marks real images (default: slots that are not all zeros, as Idefics3 drops padding images);
        pixel_attention_mask (B, N, H, W) valid pixels (Idefics3). Returns fp32 logits (B, S, V).

        segment_ids / positions describe packed rows (0 = padding); by default one causal segment per row."""
        input_ids = jnp.asarray(input_ids)
        segment_ids, positions = packing_defaults(input_ids, segment_ids, positions)
        embeds = is_image_token = None
        if pixel_values is not None:
            pixel_values = jnp.asarray(pixel_values)
            if image_mask is None:
                image_mask = jnp.any(pixel_values != 0, axis=(2, 3, 4))
            image_tokens = self.encode_images(
                pixel_values, None if pixel_attention_mask is None else jnp.asarray(pixel_attention_mask))
            is_image_token = input_ids == self.config.image_token_index
            embeds = scatter_into_tokens(image_tokens, jnp.asarray(image_mask), is_image_token)
        inputs = DecoderInputs(positions, segment_ids, None, None, None)
        return self.text(input_ids, inputs, return_hidden=return_hidden, override_embeds=embeds,
                         override_mask=is_image_token)
