"""The cross-attention VLM (Llama 3.2 Vision); the unified and contrastive ones are in unified.py and
contrastive.py. Families (vlm_jax/families/) build them."""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from vlm_jax.config import ModelConfig
from vlm_jax.models.layers import Linear, constrain, dtype_of
from vlm_jax.models.text import DecoderInputs, TextDecoder, packing_defaults
from vlm_jax.models.vision import MllamaVisionEncoder


def cross_attention_masks(cross_attention_mask, tokens_per_tile: int, segment_ids=None, image_segment_ids=None):
    """(B, S, N, T) 0/1 -> key mask (B, 1, S, N*T*P) and row mask (B, S, 1).

    Rows that may see no image attend uniformly to every key (HF zeroes their bias rather than masking all),
    and their cross-attention MLP output is zeroed by the row mask. With `image_segment_ids` (B, N), the
    owner segment of each image slot (packed rows), that fallback covers only the row's own segment's images,
    so packed samples never see each other's images; a row that owns none attends to nothing."""
    b, s, n, t = cross_attention_mask.shape
    allowed = jnp.repeat(cross_attention_mask.astype(bool), tokens_per_tile, axis=3).reshape(b, s, -1)
    row_any = allowed.any(axis=-1, keepdims=True)
    fallback = True
    if image_segment_ids is not None:
        own = image_segment_ids[:, None, :] == segment_ids[:, :, None]  # (B, S, N)
        fallback = jnp.repeat(own, t * tokens_per_tile, axis=2)
    return (allowed | (~row_any & fallback))[:, None], row_any


class CrossAttentionVLM(nn.Module):
    """Llama 3.2 Vision: tiled ViT -> linear projector -> keys/values of gated cross-attention layers."""
    config: ModelConfig
    decode: bool = False

    def setup(self):
        cfg = self.config
        self.vision = MllamaVisionEncoder(cfg)
        self.projector = Linear(cfg.text.hidden_size, ("vision_out", "embed"), use_bias=True,
                                dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype))
        self.text = TextDecoder(cfg, decode=self.decode)

    def encode_images(self, pixel_values, aspect_ratio_ids, aspect_ratio_mask):
        """Projected vision tokens (B, N*T*P, H), ordered image, tile, patch."""
        features = self.vision(pixel_values, aspect_ratio_ids, aspect_ratio_mask)
        b = features.shape[0]
        return constrain(self.projector(features).reshape(b, -1, self.config.text.hidden_size),
                         ("batch", "vision_length", "act_embed"))

    def __call__(self, input_ids, pixel_values=None, aspect_ratio_ids=None, aspect_ratio_mask=None,
                 cross_attention_mask=None, segment_ids=None, positions=None, image_segment_ids=None,
                 return_hidden: bool = False):
        """Inputs in transformers' Mllama layouts (pixel_values (B, N, T, C, H, W)); returns fp32 logits
        (B, S, V), or the final normed hidden states with `return_hidden`.

        segment_ids / positions describe packed rows (0 = padding); by default one causal segment per row.
        image_segment_ids (B, N) names the segment owning each image slot (see `cross_attention_masks`).
        In decode mode, positions must be given and vision states are computed once then read from the cache.
        """
        input_ids = jnp.asarray(input_ids)
        segment_ids, positions = packing_defaults(input_ids, segment_ids, positions)
        cross_states = None
        if pixel_values is not None:
            cross_states = self.encode_images(jnp.asarray(pixel_values), jnp.asarray(aspect_ratio_ids),
                                              jnp.asarray(aspect_ratio_mask))
        cross_mask = row_mask = None
        if cross_attention_mask is not None:
            cross_mask, row_mask = cross_attention_masks(
                jnp.asarray(cross_attention_mask), self.config.vision.num_patches, segment_ids,
                None if image_segment_ids is None else jnp.asarray(image_segment_ids))
        inputs = DecoderInputs(positions, segment_ids, cross_states, cross_mask,
                               row_mask)
        return self.text(input_ids, inputs, return_hidden=return_hidden)
