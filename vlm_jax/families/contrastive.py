"""CLIP and SigLIP dual encoders, trained contrastively on (image, caption) pairs over the global batch."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from vlm_jax.config import ModelConfig, SyntheticDataConfig, check
from vlm_jax.config.model import validate_text_encoder, validate_vit
from vlm_jax.families.base import Family, register_family
from vlm_jax.models.contrastive import ContrastiveDualEncoder
from vlm_jax.models.flops import Group, text_encoder_groups, vit_groups


class DualEncoder(Family):
    sections = ("vit", "text_encoder")
    train_data = "contrastive"
    hf_conversion = "vlm_jax.convert.contrastive"
    model_inputs = ("input_ids", "pixel_values", "attention_mask")

    def validate(self, m: ModelConfig):
        check(m.vit is not None and m.text_encoder is not None,
              f"model.vit and model.text_encoder must be set for '{self.name}'")
        validate_vit(m.vit, "model.vit")
        check(m.vit.kind == self.name, f"model.vit.kind must be '{self.name}' for family '{self.name}'")
        validate_text_encoder(m.text_encoder)
        check(not m.reward_head, f"model.reward_head: family '{self.name}' has no text decoder to score answers "
              "with; use a generative family (mllama, llava, idefics3)")

    def build(self, m: ModelConfig, decode: bool = False):
        return ContrastiveDualEncoder(m)

    def example_inputs(self, m: ModelConfig, batch: int = 1, seq_len: int = 8, num_images: int = 1) -> dict:
        v = m.vit
        return dict(input_ids=jnp.zeros((batch, min(seq_len, m.text_encoder.max_position_embeddings)), jnp.int32),
                    pixel_values=jnp.zeros((batch, v.num_channels, v.image_size, v.image_size), jnp.float32))

    def flops_groups(self, m: ModelConfig, batch: dict, padded: bool = False) -> list[Group]:
        """Both towers side by side (neither feeds the other) on every (image, caption) pair; the projections
        and the B x B similarity are negligible."""
        rows, s = batch["input_ids"].shape
        return [*vit_groups(m.vit, "vision", rows, m.scan_layers), *text_encoder_groups(m.text_encoder, rows, s,
                                                                                         m.scan_layers)]

    def synthetic_batch(self, m: ModelConfig, data: SyntheticDataConfig, batch_size: int,
                        rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Random (image, caption) pairs: captions of random words ending in eos, padded after it."""
        e, v, s = m.text_encoder, m.vit, data.seq_len
        check(2 <= s <= e.max_position_embeddings, f"train.synthetic.seq_len ({s}) must be in [2, "
              f"model.text_encoder.max_position_embeddings={e.max_position_embeddings}]")
        specials = [e.bos_token_id, e.eos_token_id, e.pad_token_id]
        words = np.setdiff1d(np.arange(e.vocab_size), specials)
        ids = words[rng.integers(0, len(words), size=(batch_size, s))]
        lengths = rng.integers(2, s + 1, size=batch_size)
        positions = np.arange(s)[None, :]
        ids[positions == (lengths - 1)[:, None]] = e.eos_token_id
        ids[positions >= lengths[:, None]] = e.pad_token_id
        pixels = rng.standard_normal((batch_size, v.num_channels, v.image_size, v.image_size), dtype=np.float32)
        return dict(input_ids=ids.astype(np.int32), pixel_values=pixels,
                    attention_mask=(positions < lengths[:, None]).astype(np.int32))


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
