"""One record -> one model-ready example: images decoded and tiled, turns templated and tokenized.

Runs in the reader threads / worker processes. Anything wrong with the record raises BadRecord.
"""
from __future__ import annotations

import numpy as np

from vlm_jax.data.bad_records import BadRecord
from vlm_jax.config import ImageConfig, ShapeConfig
from vlm_jax.data.cross_attention import image_token_spans
from vlm_jax.data.image_ops import get_image_op
from vlm_jax.data.images import decode_image
from vlm_jax.data.spec import InputSpec
from vlm_jax.data.templates import IMAGE_PLACEHOLDER, Template, expand_image_tokens


def place_images(turns: list[tuple[str, str]], num_images: int) -> list[tuple[str, str]]:
    """Records without `<image>` markers get their images at the start of the first user turn."""
    markers = sum(text.count(IMAGE_PLACEHOLDER) for _, text in turns)
    if markers == num_images:
        return turns
    if markers:
        raise BadRecord("image_count_mismatch", f"{markers} {IMAGE_PLACEHOLDER} markers, {num_images} images")
    first_user = next((i for i, (role, _) in enumerate(turns) if role == "user"), None)
    if first_user is None:
        turns = [("user", "")] + list(turns)
        first_user = 0
    turns = list(turns)
    turns[first_user] = ("user", IMAGE_PLACEHOLDER * num_images + turns[first_user][1])
    return turns


def _truncation_point(starts: np.ndarray, sizes: np.ndarray, seq_len: int) -> int:
    """seq_len, moved back to the start of an image-token block it would cut in two."""
    straddles = (starts < seq_len) & (starts + sizes > seq_len)
    return int(starts[straddles][0]) if straddles.any() else seq_len


class ExamplePreparer:
    """Callable: record {"images", "turns", ...} -> example dict of numpy arrays (see __call__).

    With `pairs`, records are preference records {"images", "turns" (the prompt), "chosen", "rejected"} and each
    becomes {"pair": [chosen example, rejected example]}: the prompt turns plus that answer as the assistant
    turn, templated and masked like SFT (loss on the answer only), the images prepared once for both."""

    def __init__(self, spec: InputSpec, template: Template, image: ImageConfig, shapes: ShapeConfig,
                 pairs: bool = False):
        self.spec, self.template, self.shapes, self.pairs = spec, template, shapes, pairs
        self.image_op = get_image_op(image.op, image_size=spec.image_size, max_tiles=image.max_tiles,
                                     mean=spec.image_mean, std=spec.image_std, thumbnail=image.thumbnail)
        self.unified = spec.unified

    def __call__(self, record: dict) -> dict:
        """Returns tokens (L,) int32, loss_mask (L,) bool, images [(n, 3, H, W) float32], aspect_ratio_ids,
        num_tiles (per image), spans ((images, 2) cross-attention token ranges), num_slots, truncated."""
        preference = "chosen" in record
        if preference != self.pairs:
            raise BadRecord("record_kind", "a preference record (chosen/rejected) where the objective reads SFT "
                            "records" if preference else "an SFT record where the objective reads preference pairs")
        turns = place_images(record["turns"], len(record["images"]))
        tiles = self._tiles(record["images"])
        if not preference:
            return self._build(tiles, turns)
        pair = [self._build(tiles, [*turns, ("assistant", record[k])]) for k in ("chosen", "rejected")]
        return {"pair": pair, "truncated": any(e["truncated"] for e in pair)}

    def prompt(self, record: dict) -> tuple[dict, str]:
        """(example, reference answer) for generation: the turns before a final assistant turn, ending with the
        assistant header; the reference is that turn's text, or a preference record's chosen answer ("" when
        there is neither)."""
        turns = place_images(record["turns"], len(record["images"]))
        answer = record.get("chosen", "")
        if turns[-1][0] == "assistant":
            turns, answer = turns[:-1], turns[-1][1]
        return self._build(self._tiles(record["images"]), turns, generation=True), answer

    def _tiles(self, raw_images: list) -> list:
        if not self.unified and len(raw_images) > self.shapes.max_images:
            raise BadRecord("too_many_images", f"{len(raw_images)} > data.shapes.max_images={self.shapes.max_images}")
        return [self.image_op(decode_image(raw)) for raw in raw_images]

    def _build(self, tiles: list, turns: list[tuple[str, str]], generation: bool = False) -> dict:
        tokens, loss_mask = self.template.encode(turns, add_generation_prompt=generation)
        if (found := int(np.sum(tokens == self.template.image_id))) != len(tiles):
            # The text itself spells the image token; it would steal an image's cross-attention span.
            raise BadRecord("image_count_mismatch", f"{found} image tokens after tokenizing, {len(tiles)} images")
        slots_per_image = np.array([t.num_tiles if self.unified else 1 for t in tiles], np.int64)
        if slots_per_image.sum() > self.shapes.max_images:
            raise BadRecord("too_many_images",
                            f"{slots_per_image.sum()} image slots > data.shapes.max_images={self.shapes.max_images}")
        block_sizes = slots_per_image * (self.spec.tokens_per_image if self.unified else 1)
        if self.unified:
            tokens, loss_mask = expand_image_tokens(tokens, loss_mask, self.template.image_id, block_sizes)
        truncated = len(tokens) > self.shapes.seq_len
        if truncated and generation:
            raise BadRecord("too_long", f"prompt of {len(tokens)} tokens > data.shapes.seq_len={self.shapes.seq_len}")
        if truncated:
            if self.shapes.overflow == "drop":
                raise BadRecord("too_long", f"{len(tokens)} tokens > data.shapes.seq_len={self.shapes.seq_len}")
            first_token_of_block = np.cumsum(block_sizes) - block_sizes
            block_starts = np.flatnonzero(tokens == self.template.image_id)[first_token_of_block]
            cut = _truncation_point(block_starts, block_sizes, self.shapes.seq_len)
            tiles = tiles[:int(np.sum(block_starts + block_sizes <= cut))]
            tokens, loss_mask = tokens[:cut], loss_mask[:cut]
            slots_per_image = slots_per_image[:len(tiles)]
        if not generation and not loss_mask.any():
            raise BadRecord("too_long", "nothing left to supervise after truncation to data.shapes.seq_len")
        return {
            "tokens": tokens.astype(np.int32),
            "loss_mask": loss_mask,
            "images": [t.pixels for t in tiles],
            "aspect_ratio_ids": np.array([t.aspect_ratio_id for t in tiles], np.int32),
            "num_tiles": np.array([t.num_tiles for t in tiles], np.int32),
            "spans": np.zeros((0, 2), np.int32) if self.unified else image_token_spans(tokens, self.template.image_id),
            "num_slots": int(slots_per_image.sum()),
            "truncated": truncated,
        }
