"""What the model needs from the data: its family, image geometry and image-token conventions."""
from __future__ import annotations

from dataclasses import dataclass

from vlm_jax.data.tiling import supported_aspect_ratios

FAMILIES = ("cross_attention", "unified")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)
# (mean, std) of the image processors published with each ViT kind (LLaVA 1.5: CLIP's; Idefics3: SigLIP's).
TOWER_NORMALIZATION = {"clip": (CLIP_MEAN, CLIP_STD), "siglip": (SIGLIP_MEAN, SIGLIP_STD)}


@dataclass(frozen=True)
class InputSpec:
    family: str = "cross_attention"  # "cross_attention" (Mllama) | "unified" (LLaVA, Idefics3)
    image_size: int = 560  # tile side (Mllama, CATTY) or resized side (plain resize)
    max_tiles: int = 4  # cross_attention: the model's max_num_tiles, the T axis of pixel_values
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    tokens_per_image: int = 0  # unified: tokens one image slot expands to
    image_token_id: int | None = None  # when set, must equal the tokenizer's <|image|> id

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"InputSpec.family '{self.family}' is not one of {FAMILIES}")
        if self.family == "unified" and self.tokens_per_image <= 0:
            raise ValueError("InputSpec.tokens_per_image must be positive for the unified family")


def input_spec_from_model(model_cfg) -> InputSpec:
    """The InputSpec of a vlm_jax ModelConfig: Mllama (cross_attention) or LLaVA/Idefics3 (unified)."""
    from vlm_jax.config import UNIFIED_FAMILIES
    if model_cfg.family in UNIFIED_FAMILIES:
        return _unified_spec(model_cfg)
    if model_cfg.family != "mllama":
        raise ValueError(f"model.family '{model_cfg.family}' is not a vision-language model the data pipeline "
                         "can feed; use mllama, llava or idefics3")
    v = model_cfg.vision
    grids = supported_aspect_ratios(v.max_num_tiles)
    if tuple(map(tuple, v.supported_aspect_ratios)) != grids:
        raise ValueError(f"model.vision.supported_aspect_ratios must be {[list(g) for g in grids]} (the order the "
                         "tiler numbers aspect_ratio_ids) for max_num_tiles={v.max_num_tiles}")
    return InputSpec("cross_attention", v.image_size, v.max_num_tiles, tuple(v.image_mean), tuple(v.image_std),
                     image_token_id=model_cfg.image_token_index)


def _unified_spec(model_cfg) -> InputSpec:
    """Each image slot is one model.vit.image_size square, expanded to as many <image> tokens as the connector
    returns features (the model's own count, `tokens_per_image`)."""
    from vlm_jax.models.unified import tokens_per_image  # models import the config, which imports data/
    v = model_cfg.vit
    mean, std = TOWER_NORMALIZATION[v.kind]
    return InputSpec("unified", v.image_size, image_mean=mean, image_std=std,
                     tokens_per_image=tokens_per_image(model_cfg), image_token_id=model_cfg.image_token_index)
