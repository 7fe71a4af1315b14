"""What the model needs from the data (`InputSpec`): image layout and geometry, image-token conventions.

A family (vlm_jax/families/) builds its model's spec; the pipeline reads nothing else about the model.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vlm_jax.data.bad_records import BadRecord

# "cross_attention": each image is one slot with a tile axis, reached through a cross-attention mask (Mllama).
# "unified": each tile (or thumbnail) is its own slot, expanded in the text to tokens_per_image tokens (LLaVA).
LAYOUTS = ("cross_attention", "unified")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)
# (mean, std) of the image processors published with each ViT kind (LLaVA 1.5: CLIP's; Idefics3: SigLIP's).
TOWER_NORMALIZATION = {"clip": (CLIP_MEAN, CLIP_STD), "siglip": (SIGLIP_MEAN, SIGLIP_STD)}


@dataclass(frozen=True)
class InputSpec:
    layout: str = "cross_attention"  # one of LAYOUTS
    image_size: int = 560  # tile side (Mllama, CATTY) or resized side (plain resize)
    max_tiles: int = 4  # cross_attention: the model's max_num_tiles, the T axis of pixel_values
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    tokens_per_image: int = 0  # unified: tokens one image slot expands to
    image_token_id: int | None = None  # when set, must equal the tokenizer's <|image|> id

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"InputSpec.layout '{self.layout}' is not one of {LAYOUTS}")
        if self.layout == "unified" and self.tokens_per_image <= 0:
            raise ValueError("InputSpec.tokens_per_image must be positive for the unified layout")

    @property
    def unified(self) -> bool:
        return self.layout == "unified"


def check_image_tokens(input_ids, num_images: int, spec: InputSpec):
    """Host-side check of an expanded unified row: as many `<image>` tokens as the real images produce features.
    Raises BadRecord('image_count_mismatch') with a one-line reason, so the pipeline counts and skips it."""
    found = int((np.asarray(input_ids) == spec.image_token_id).sum())
    expected = num_images * spec.tokens_per_image
    if found != expected:
        raise BadRecord("image_count_mismatch", f"{found} <image> tokens but {num_images} images x "
                        f"{spec.tokens_per_image} features = {expected}")
