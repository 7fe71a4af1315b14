"""LLaVA and Idefics3 (and POINTS-style dual towers): CLIP/SigLIP features -> a connector -> tokens in the
Llama decoder's sequence, one block of `tokens_per_image` per image slot."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from vlm_jax.config import ModelConfig, SyntheticDataConfig, check
from vlm_jax.config.model import ACTIVATIONS, validate_text, validate_vit
from vlm_jax.data.spec import TOWER_NORMALIZATION, InputSpec
from vlm_jax.families.base import Family, register_family, synthetic_text
from vlm_jax.models.flops import Group, decoder_groups, vit_groups
from vlm_jax.models.unified import UnifiedVLM, feature_tokens, tokens_per_image
from vlm_jax.registry import CONNECTORS


class Unified(Family):
    sections = ("vit", "ocr_vit", "connector", "text")
    model_inputs = ("input_ids", "pixel_values", "image_mask", "segment_ids", "positions")

    def validate(self, m: ModelConfig):
        c = m.connector
        check(m.vit is not None, f"model.vit must be set for family '{self.name}'")
        validate_vit(m.vit, "model.vit")
        validate_text(m)
        check(not m.text.cross_attention_layers,
              f"model.text.cross_attention_layers must be [] for family '{self.name}' (image tokens are embedded)")
        connector = CONNECTORS.get(c.kind, "model.connector.kind")
        check(c.feature_strategy in ("default", "full"),
              f"model.connector.feature_strategy: '{c.feature_strategy}' is not 'default' or 'full'")
        check(c.hidden_act in ACTIVATIONS, f"model.connector.hidden_act: '{c.hidden_act}' is not one of {ACTIVATIONS}")
        for i in c.feature_layers:
            check(-m.vit.num_layers - 1 <= i <= m.vit.num_layers,
                  f"model.connector.feature_layers: {i} is out of range for {m.vit.num_layers} layers")
        connector.validate(m)

    def build(self, m: ModelConfig, decode: bool = False):
        return UnifiedVLM(m, decode=decode)

    def example_inputs(self, m: ModelConfig, batch: int = 1, seq_len: int = 8, num_images: int = 1) -> dict:
        v = m.vit
        return dict(input_ids=jnp.zeros((batch, seq_len), jnp.int32), pixel_values=jnp.zeros(
            (batch, num_images, v.num_channels, v.image_size, v.image_size), jnp.float32))

    def flops_groups(self, m: ModelConfig, batch: dict, padded: bool = False) -> list[Group]:
        """The towers on every present image (image_mask), the connector, the decoder on the whole sequence (image
        tokens included)."""
        rows, s = batch["input_ids"].shape
        mask = batch.get("image_mask")
        images = float(np.prod(batch["pixel_values"].shape[:2]) if padded or mask is None else np.asarray(mask).sum())
        towers = [vit_groups(m.vit, "vision", images, m.scan_layers)]
        if m.ocr_vit is not None:
            towers.append(vit_groups(m.ocr_vit, "ocr_vision", images, m.scan_layers))
        connector = Group("connector", "connector/",
                          images * CONNECTORS.get(m.connector.kind).forward_flops(m, feature_tokens(m)),
                          tuple(t[-1].name for t in towers))
        return [*(g for t in towers for g in t), connector, *decoder_groups(m, rows, s, embeds_from=(connector.name,))]

    def input_spec(self, m: ModelConfig) -> InputSpec:
        """Each image slot is one model.vit.image_size square, expanded to as many <image> tokens as the connector
        returns features (the model's own count, `tokens_per_image`)."""
        mean, std = TOWER_NORMALIZATION[m.vit.kind]
        return InputSpec("unified", m.vit.image_size, image_mean=mean, image_std=std,
                         tokens_per_image=tokens_per_image(m), image_token_id=m.image_token_index)

    def synthetic_batch(self, m: ModelConfig, data: SyntheticDataConfig, batch_size: int,
                        rng: np.random.Generator) -> dict[str, np.ndarray]:
        """`data.num_images` random images per row, their image tokens right after BOS, then text."""
        image_tokens = data.num_images * tokens_per_image(m)
        check(data.seq_len >= 2 * (1 + image_tokens),
              f"train.synthetic.seq_len ({data.seq_len}) must be at least twice BOS + the {image_tokens} image "
              f"tokens of train.synthetic.num_images={data.num_images} (the second half of a row is supervised)")
        text = synthetic_text(m, data, batch_size, rng)
        text["input_ids"][:, 1:1 + image_tokens] = m.image_token_index
        v = m.vit
        shape = (batch_size, data.num_images, v.num_channels, v.image_size, v.image_size)
        return dict(input_ids=text["input_ids"], pixel_values=rng.standard_normal(shape, dtype=np.float32),
                    image_mask=np.ones((batch_size, data.num_images), np.int32), loss_mask=text["loss_mask"])


@register_family
class Llava(Unified):
    name = "llava"
    hf_conversion = "vlm_jax.convert.llava"
    hf_model_types = ("llava",)


@register_family
class Idefics3(Unified):
    name = "idefics3"
    hf_conversion = "vlm_jax.convert.idefics3"
    hf_model_types = ("idefics3",)
