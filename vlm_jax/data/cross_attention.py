"""Which text tokens may attend to which image: MllamaProcessor's rule, as token spans and dense masks."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def image_token_spans(input_ids: Sequence[int], image_token_id: int) -> np.ndarray:
    """(num_images, 2) [start, end) token ranges, one per image token, as MllamaProcessor computes them.

    Image k sees tokens from its own image token up to the next image token; the last image sees the rest
    of the sequence; a run of consecutive image tokens all extend to the end of the run's last range.
    Tokens before the first image see no image.
    """
    ids = np.asarray(input_ids)
    starts = np.flatnonzero(ids == image_token_id)
    ends = np.append(starts[1:], len(ids))
    # Walk back so a run of adjacent image tokens inherits the end of the image after it.
    for k in range(len(starts) - 2, -1, -1):
        if ends[k] == starts[k] + 1:
            ends[k] = ends[k + 1]
    return np.stack([starts, ends], axis=1).astype(np.int32) if len(starts) else np.zeros((0, 2), np.int32)


def dense_cross_attention_mask(spans: np.ndarray, num_tiles: Sequence[int], length: int,
                               max_images: int, max_tiles: int) -> np.ndarray:
    """(length, max_images, max_tiles) int32: 1 where token s may attend to tile t of image k."""
    mask = np.zeros((length, max_images, max_tiles), np.int32)
    for k, ((start, end), tiles) in enumerate(zip(spans, num_tiles)):
        mask[start:min(end, length), k, :tiles] = 1
    return mask


def cross_attention_mask(input_ids: Sequence[int], image_token_id: int, num_tiles: Sequence[int],
                         max_tiles: int, max_images: int | None = None) -> np.ndarray:
    """MllamaProcessor's cross_attention_mask for one sequence: (len(input_ids), max_images, max_tiles)."""
    spans = image_token_spans(input_ids, image_token_id)
    return dense_cross_attention_mask(spans, num_tiles, len(input_ids),
                                      len(spans) if max_images is None else max_images, max_tiles)
