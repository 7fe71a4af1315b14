"""Tiny random transformers models (no downloads) and inputs that exercise the parity traps."""
from __future__ import annotations

import numpy as np
import torch

TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_global_layers=2,
                   attention_heads=4, image_size=28, patch_size=7, max_num_tiles=4,
                   intermediate_layers_indices=[1, 3], vision_output_dim=32 * 3)
TINY_TEXT = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, cross_attention_layers=[1, 3],
                 max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                 rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                  "original_max_position_embeddings": 64})
IMAGE_TOKEN = 128


def tiny_mllama(seed: int = 0, text=None, vision=None):
    """A random MllamaForConditionalGeneration with every gate non-zero (HF initialises them to 0)."""
    from transformers import MllamaConfig, MllamaForConditionalGeneration
    torch.manual_seed(seed)
    config = MllamaConfig(vision_config={**TINY_VISION, **(vision or {})}, text_config={**TINY_TEXT, **(text or {})},
                          image_token_index=IMAGE_TOKEN)
    model = MllamaForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gate" in name and p.numel() == 1:
                p.copy_(torch.empty(1).uniform_(-1.0, 1.0) + 0.5)
            elif name.endswith(("embedding.weight", "class_embedding")) or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def mllama_batch(seed: int = 0, seq_len: int = 16, tile: int = 28, max_tiles: int = 4, vocab: int = 128):
    """Three samples, two image slots: sample 0 has two images (ratios (2,2) and (1,2)), text before the first
    image token and consecutive image tokens; sample 1 has one image (ratio (1,3)) and a padded image slot;
    sample 2 is text-only (both slots padded, no image token)."""
    rng = np.random.default_rng(seed)
    b, n, t = 3, 2, max_tiles
    ids = rng.integers(3, vocab, size=(b, seq_len)).astype(np.int64)
    ids[0, [3, 4]] = IMAGE_TOKEN  # consecutive image tokens after 3 text tokens
    ids[1, 5] = IMAGE_TOKEN
    pixel_values = rng.standard_normal((b, n, t, 3, tile, tile)).astype(np.float32)
    aspect_ratio_ids = np.array([[6, 2], [3, 0], [0, 0]], np.int64)
    num_tiles = np.array([[4, 2], [3, 0], [0, 0]])
    aspect_ratio_mask = np.zeros((b, n, t), np.int64)
    for i in range(b):
        for j in range(n):
            aspect_ratio_mask[i, j, :max(num_tiles[i, j], 1)] = 1  # tile 0 set even for the padded image
            pixel_values[i, j, num_tiles[i, j]:] = 0
    cross = np.zeros((b, seq_len, n, t), np.int64)
    cross[0, 3:, 0, :4] = 1  # image 0 from its token to the end (consecutive tokens extend to the end)
    cross[0, 3:, 1, :2] = 1
    cross[1, 5:, 0, :3] = 1
    return dict(input_ids=ids, pixel_values=pixel_values, aspect_ratio_ids=aspect_ratio_ids,
                aspect_ratio_mask=aspect_ratio_mask, cross_attention_mask=cross)


def torch_inputs(batch: dict) -> dict:
    return {k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()}


# ----------------------------------------------------------------------- unified and contrastive families

TINY_VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=28,
                patch_size=7)
TINY_LLAMA = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
TINY_TEXT_ENCODER = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16)


def _perturb(model, seed: int):
    """Random norms, biases and embeddings (HF initialises many to 0/1, which would hide layout bugs)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(("bias", "embedding", "probe", "logit_scale")):
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def tiny_llava(tower: str = "clip", seed: int = 0, **top):
    """A random LlavaForConditionalGeneration with a CLIP or SigLIP tower."""
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                              SiglipVisionConfig)
    torch.manual_seed(seed)
    vision = (CLIPVisionConfig if tower == "clip" else SiglipVisionConfig)(**TINY_VIT)
    config = LlavaConfig(vision_config=vision, text_config=LlamaConfig(**TINY_LLAMA), image_token_index=IMAGE_TOKEN - 1,
                         **top)
    return _perturb(LlavaForConditionalGeneration(config), seed)


def tiny_idefics3(seed: int = 0):
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration
    torch.manual_seed(seed)
    config = Idefics3Config(vision_config=TINY_VIT, text_config=TINY_LLAMA, image_token_id=IMAGE_TOKEN - 1,
                            scale_factor=2)
    return _perturb(Idefics3ForConditionalGeneration(config), seed)


def tiny_dual_encoder(family: str, seed: int = 0):
    """A random CLIPModel or SiglipModel; CLIP's eos id is the largest id so pooling looks it up."""
    from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel
    torch.manual_seed(seed)
    text = dict(TINY_TEXT_ENCODER, bos_token_id=97, eos_token_id=98, pad_token_id=99)
    if family == "clip":
        model = CLIPModel(CLIPConfig(vision_config=TINY_VIT, text_config=text, projection_dim=16))
    else:
        model = SiglipModel(SiglipConfig(vision_config=TINY_VIT, text_config=text))
    return _perturb(model, seed)


def unified_batch(tokens_per_image: int, seed: int = 0, num_slots: int = 2, seq_len: int = 40, side: int = 28,
                  images_per_row=(2, 1), vocab: int = 127):
    """Rows with `images_per_row` real images each (the rest of the slots all-zero padding), each image's
    tokens as one contiguous run after some text."""
    rng = np.random.default_rng(seed)
    b = len(images_per_row)
    ids = rng.integers(3, vocab - 1, size=(b, seq_len)).astype(np.int64)
    pixels = np.zeros((b, num_slots, 3, side, side), np.float32)
    for row, count in enumerate(images_per_row):
        pixels[row, :count] = rng.standard_normal((count, 3, side, side))
        for k in range(count):
            start = 2 + k * (tokens_per_image + 2)
            ids[row, start:start + tokens_per_image] = IMAGE_TOKEN - 1
    return dict(input_ids=ids, pixel_values=pixels)


def assert_same_tensors(expected: dict, actual: dict):
    """Same tensor names, dtypes, shapes and bytes (bitwise; bf16 included)."""
    assert sorted(expected) == sorted(actual)
    for key, value in expected.items():
        other = actual[key]
        assert (value.dtype, value.shape) == (other.dtype, other.shape), key
        assert np.ascontiguousarray(value).tobytes() == np.ascontiguousarray(other).tobytes(), key
