"""CLIP and SigLIP dual encoders, trained contrastively on (image, caption) pairs over the global batch."""
from __future__ import annotations

import jax.numpy as jnp

from vlm_jax.config import ModelConfig, check
from vlm_jax.config.model import validate_text_encoder, validate_vit
from vlm_jax.families.base import Family, register_family
from vlm_jax.models.contrastive import ContrastiveDualEncoder
from vlm_jax.models.flops import text_encoder_flops, vit_flops


class DualEncoder(Family):
    sections = ("vit", "text_encoder")
    train_data = "contrastive"
    hf_conversion = "vlm_jax.convert.contrastive"
    model_inputs = ("input_ids", "pixel_values", "attention_mask")
    towers = ("vision", "text")  # side by side: neither feeds the other

    def validate(self, m: ModelConfig):
        check(m.vit is not None and m.text_encoder is not None,
              f"model.vit and model.text_encoder must be set for '{self.name}'")
        validate_vit(m.vit, "model.vit")
        check(m.vit.kind == self.name, f"model.vit.kind must be '{self.name}' for family '{self.name}'")
        validate_text_encoder(m.text_encoder)

    def build(self, m: ModelConfig, decode: bool = False):
        return ContrastiveDualEncoder(m)

    def example_inputs(self, m: ModelConfig, batch: int = 1, seq_len: int = 8, num_images: int = 1) -> dict:
        v = m.vit
        return dict(input_ids=jnp.zeros((batch, min(seq_len, m.text_encoder.max_position_embeddings)), jnp.int32),
                    pixel_values=jnp.zeros((batch, v.num_channels, v.image_size, v.image_size), jnp.float32))

    def forward_flops(self, m: ModelConfig, seq_len: int, num_images: int) -> dict[str, float]:
        """One (image, caption) pair: both towers; the projections and the B x B similarity are negligible."""
        return {"vision": vit_flops(m.vit, 1), "text": text_encoder_flops(m.text_encoder, seq_len)}


@register_family
class Clip(DualEncoder):
    name = "clip"
    objective = "softmax_contrastive"
    hf_model_types = ("clip",)


@register_family
class Siglip(DualEncoder):
    name = "siglip"
    objective = "sigmoid_contrastive"
    hf_model_types = ("siglip",)
