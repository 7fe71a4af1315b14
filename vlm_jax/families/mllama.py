"""Llama 3.2 Vision (Mllama): tiled ViT -> projector -> gated cross-attention layers of a Llama decoder."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from vlm_jax.config import ModelConfig, SyntheticDataConfig, check
from vlm_jax.config.model import validate_mllama_vision, validate_text
from vlm_jax.data.spec import InputSpec
from vlm_jax.data.tiling import supported_aspect_ratios
from vlm_jax.errors import ConfigError
from vlm_jax.families.base import Family, register_family, synthetic_text
from vlm_jax.models.flops import Group, decoder_groups, encoder_groups
from vlm_jax.models.vlm import CrossAttentionVLM

IMAGE_INPUTS = ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")


@register_family
class Mllama(Family):
    name = "mllama"
    sections = ("vision", "text")
    hf_conversion = "vlm_jax.convert.mllama"
    hf_model_types = ("mllama",)
    model_inputs = ("input_ids", *IMAGE_INPUTS, "cross_attention_mask", "segment_ids", "positions",
                    "image_segment_ids")
    generation_inputs = IMAGE_INPUTS

    def validate(self, m: ModelConfig):
        validate_mllama_vision(m.vision)
        validate_text(m)

    def build(self, m: ModelConfig, decode: bool = False):
        return CrossAttentionVLM(m, decode=decode)

    def example_inputs(self, m: ModelConfig, batch: int = 1, seq_len: int = 8, num_images: int = 1) -> dict:
        v = m.vision
        t = v.max_num_tiles
        return dict(
            input_ids=jnp.zeros((batch, seq_len), jnp.int32),
            pixel_values=jnp.zeros((batch, num_images, t, v.num_channels, v.image_size, v.image_size), jnp.float32),
            aspect_ratio_ids=jnp.ones((batch, num_images), jnp.int32),
            aspect_ratio_mask=jnp.ones((batch, num_images, t), jnp.int32),
            cross_attention_mask=jnp.ones((batch, seq_len, num_images, t), jnp.int32),
        )

    def flops_groups(self, m: ModelConfig, batch: dict, padded: bool = False) -> list[Group]:
        """The tiled encoder on the tiles present (aspect_ratio_mask of the slots whose aspect_ratio_ids is not 0,
        the padded-slot id; an image's tiles attend jointly), the projector, and the decoder whose cross-attention
        layers read every present tile's patches."""
        v, scanned = m.vision, m.scan_layers
        rows, s = batch["input_ids"].shape
        mask = batch["aspect_ratio_mask"]
        if padded:
            tiles = np.full(mask.shape[:2], v.max_num_tiles)
        else:  # transformers marks tile 0 of padded slots too
            tiles = np.asarray(mask).sum(-1) * (np.asarray(batch["aspect_ratio_ids"]) > 0)
        total, squares = float(tiles.sum()), float((tiles.astype(np.float64) ** 2).sum())
        p, h = v.padded_num_patches, v.hidden_size
        embed = Group("vision/embed", "vision/(?!transformer/|global_transformer/)",
                      2 * total * v.num_patches * v.num_channels * v.patch_size ** 2 * h)
        layer = dict(scanned=scanned, tokens=total * p, pairs=squares * p * p, hidden=h,
                     intermediate=v.intermediate_size, heads=v.num_heads)
        local = encoder_groups("vision/", "transformer", v.num_layers, inputs=(embed.name,), **layer)
        global_ = encoder_groups("vision/", "global_transformer", v.num_global_layers, inputs=(local[-1].name,),
                                 **layer)
        projector = Group("projector", "projector/", 2 * total * v.num_patches * v.output_dim * m.text.hidden_size,
                          (global_[-1].name,))
        return [embed, *local, *global_, projector,
                *decoder_groups(m, rows, s, total * v.num_patches, projector.name)]

    def input_spec(self, m: ModelConfig) -> InputSpec:
        v = m.vision
        grids = supported_aspect_ratios(v.max_num_tiles)
        check(tuple(map(tuple, v.supported_aspect_ratios)) == grids,
              f"model.vision.supported_aspect_ratios must be {[list(g) for g in grids]} (the order the tiler "
              f"numbers aspect_ratio_ids) for max_num_tiles={v.max_num_tiles}")
        return InputSpec("cross_attention", v.image_size, v.max_num_tiles, tuple(v.image_mean), tuple(v.image_std),
                         image_token_id=m.image_token_index)

    def synthetic_batch(self, m: ModelConfig, data: SyntheticDataConfig, batch_size: int,
                        rng: np.random.Generator) -> dict[str, np.ndarray]:
        """One image of `data.num_tiles` random tiles per row, seen from the image token on."""
        v = m.vision
        ratio = (1, data.num_tiles)
        if ratio not in v.supported_aspect_ratios:
            raise ConfigError(f"train.synthetic.num_tiles={data.num_tiles}: aspect ratio {ratio} is not in "
                              f"model.vision.supported_aspect_ratios")
        b, s, n, tiles = batch_size, data.seq_len, data.num_images, data.num_tiles
        image_slot = min(1, s - 1)
        text = synthetic_text(m, data, b, rng, image_slot)
        pixels = np.zeros((b, n, v.max_num_tiles, v.num_channels, v.image_size, v.image_size), np.float32)
        pixels[:, :, :tiles] = rng.standard_normal(pixels[:, :, :tiles].shape, dtype=np.float32)
        tile_mask = np.zeros((b, n, v.max_num_tiles), np.int32)
        tile_mask[:, :, :tiles] = 1
        cross = np.zeros((b, s, n, v.max_num_tiles), np.int32)
        cross[:, image_slot:, :, :tiles] = 1
        aspect_ratio_id = v.supported_aspect_ratios.index(ratio) + 1
        return dict(input_ids=text["input_ids"], pixel_values=pixels,
                    aspect_ratio_ids=np.full((b, n), aspect_ratio_id, np.int32),
                    aspect_ratio_mask=tile_mask, cross_attention_mask=cross, loss_mask=text["loss_mask"])
