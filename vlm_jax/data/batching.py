"""Rows of prepared examples -> one batch of fixed-shape numpy arrays (the model's input contract).

All families: input_ids (B, S) int32, loss_mask (B, S) float32 (1 where input_ids[:, s] is a target),
segment_ids (B, S) int32 (1..k per packed sample, 0 = padding), positions (B, S) int32 (from 0 per segment).
cross_attention (Mllama): pixel_values (B, N, T, C, H, W) float32, aspect_ratio_ids (B, N) int32 (0 = no image),
  aspect_ratio_mask (B, N, T) int32, cross_attention_mask (B, S, N, T) int32, image_segment_ids (B, N) int32
  (the segment owning each image slot, 0 = empty slot: tokens that may see no image attend to nothing).
unified (LLaVA): pixel_values (B, N, C, H, W) float32, image_mask (B, N) int32 (1 = slot holds an image).
Packed samples get consecutive image slots, and each sample's cross-attention reaches only its own slots.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vlm_jax.config import ShapeConfig
from vlm_jax.data.spec import InputSpec


def _text_arrays(rows: Sequence[Sequence[dict]], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    batch = len(rows)
    out = {"input_ids": np.full((batch, seq_len), pad_id, np.int32),
           "loss_mask": np.zeros((batch, seq_len), np.float32),
           "segment_ids": np.zeros((batch, seq_len), np.int32),
           "positions": np.zeros((batch, seq_len), np.int32)}
    for b, row in enumerate(rows):
        offset = 0
        for segment, example in enumerate(row, 1):
            n = len(example["tokens"])
            out["input_ids"][b, offset:offset + n] = example["tokens"]
            out["loss_mask"][b, offset:offset + n] = example["loss_mask"]
            out["segment_ids"][b, offset:offset + n] = segment
            out["positions"][b, offset:offset + n] = np.arange(n)
            offset += n
    return out


def _cross_attention_images(rows, spec: InputSpec, shapes: ShapeConfig) -> dict[str, np.ndarray]:
    b_, n_, t_, s_, size = len(rows), shapes.max_images, spec.max_tiles, shapes.seq_len, spec.image_size
    pixel_values = np.zeros((b_, n_, t_, 3, size, size), np.float32)
    aspect_ratio_ids = np.zeros((b_, n_), np.int32)
    aspect_ratio_mask = np.zeros((b_, n_, t_), np.int32)
    aspect_ratio_mask[:, :, 0] = 1  # transformers marks tile 0 of every slot, padded slots included
    cross_attention_mask = np.zeros((b_, s_, n_, t_), np.int32)
    image_segment_ids = np.zeros((b_, n_), np.int32)
    for b, row in enumerate(rows):
        offset = slot = 0
        for segment, example in enumerate(row, 1):
            for pixels, ar_id, tiles, (start, end) in zip(example["images"], example["aspect_ratio_ids"],
                                                          example["num_tiles"], example["spans"]):
                pixel_values[b, slot, :tiles] = pixels
                aspect_ratio_ids[b, slot] = ar_id
                aspect_ratio_mask[b, slot, :tiles] = 1
                cross_attention_mask[b, offset + start:offset + end, slot, :tiles] = 1
                image_segment_ids[b, slot] = segment
                slot += 1
            offset += len(example["tokens"])
    return {"pixel_values": pixel_values, "aspect_ratio_ids": aspect_ratio_ids,
            "aspect_ratio_mask": aspect_ratio_mask, "cross_attention_mask": cross_attention_mask,
            "image_segment_ids": image_segment_ids}


def _unified_images(rows, spec: InputSpec, shapes: ShapeConfig) -> dict[str, np.ndarray]:
    pixel_values = np.zeros((len(rows), shapes.max_images, 3, spec.image_size, spec.image_size), np.float32)
    image_mask = np.zeros((len(rows), shapes.max_images), np.int32)
    for b, row in enumerate(rows):
        slot = 0
        for example in row:
            for pixels in example["images"]:  # each tile (or thumbnail) is its own slot
                pixel_values[b, slot:slot + len(pixels)] = pixels
                image_mask[b, slot:slot + len(pixels)] = 1
                slot += len(pixels)
    return {"pixel_values": pixel_values, "image_mask": image_mask}


def collate(rows: Sequence[Sequence[dict]], spec: InputSpec, shapes: ShapeConfig, pad_id: int
            ) -> dict[str, np.ndarray]:
    images = _unified_images if spec.unified else _cross_attention_images
    return {**_text_arrays(rows, shapes.seq_len, pad_id), **images(rows, spec, shapes)}
