"""Image tiling: Mllama (bit-compatible with transformers' PIL backend) and POINTS' CATTY.

Every function takes an (H, W, 3) uint8 RGB array. The `*_uint8` variants stop before normalisation so a
caller can normalise straight into the layout it needs; `normalize` reproduces transformers' arithmetic
(rescale in float64, cast to float32, then (x - mean) / std in float32).
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import numpy as np
from PIL import Image


class Tiles(NamedTuple):
    pixels: np.ndarray  # (num_tiles, tile, tile, 3) float32 normalised (uint8 from the *_uint8 variants)
    aspect_ratio_id: int  # 1-based index of the tile grid in `supported_aspect_ratios`
    num_tiles: int


def normalize(pixels: np.ndarray, mean, std, channel_axis: int = -1) -> np.ndarray:
    """uint8 pixels -> float32 ((x / 255) - mean) / std, rounding exactly as transformers does."""
    shape = [1] * pixels.ndim
    shape[channel_axis] = -1
    mean = np.asarray(mean, np.float32).reshape(shape)
    std = np.asarray(std, np.float32).reshape(shape)
    x = (pixels.astype(np.float64) * (1 / 255)).astype(np.float32)
    return (x - mean) / std


def _resize(image: np.ndarray, height: int, width: int, resample=Image.BILINEAR) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((width, height), resample=resample))


def _split(canvas: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """(rows*t, cols*t, C) -> (rows*cols, t, t, C), row-major."""
    t = canvas.shape[0] // rows
    return canvas.reshape(rows, t, cols, t, -1).transpose(0, 2, 1, 3, 4).reshape(rows * cols, t, t, -1)


# ------------------------------------------------------------------------------------------- Mllama


@functools.lru_cache(maxsize=16)
def supported_aspect_ratios(max_tiles: int) -> tuple[tuple[int, int], ...]:
    """Tile grids (rows, cols) with rows * cols <= max_tiles, in the order transformers numbers them."""
    return tuple((a, b) for a in range(1, max_tiles + 1) for b in range(1, max_tiles + 1) if a * b <= max_tiles)


def _optimal_canvas(height: int, width: int, max_tiles: int, tile: int) -> tuple[int, int]:
    """The smallest upscaling canvas if any grid allows upscaling, else the mildest downscale;
    ties go to the smallest area (transformers' get_optimal_tiled_canvas)."""
    canvases = np.array(supported_aspect_ratios(max_tiles)) * tile
    heights, widths = canvases.T
    scale_h, scale_w = heights / height, widths / width
    scales = np.where(scale_w > scale_h, scale_h, scale_w)
    up = scales[scales >= 1]
    chosen = canvases[scales == (np.min(up) if len(up) else np.max(scales[scales < 1]))]
    best = chosen[np.argmin(chosen[:, 0] * chosen[:, 1])] if len(chosen) > 1 else chosen[0]
    return int(best[0]), int(best[1])


def _fit_to_canvas(height: int, width: int, canvas_h: int, canvas_w: int, tile: int) -> tuple[int, int]:
    """Keep the aspect ratio, fit inside the canvas, never shrink a side below one tile."""
    target_w = np.clip(width, tile, canvas_w)
    target_h = np.clip(height, tile, canvas_h)
    scale_h, scale_w = target_h / height, target_w / width
    if scale_w < scale_h:
        return int(min(math.floor(height * scale_w) or 1, target_h)), int(target_w)
    return int(target_h), int(min(math.floor(width * scale_h) or 1, target_w))


def mllama_tile_uint8(image: np.ndarray, tile_size: int, max_tiles: int) -> Tiles:
    """Resize onto the best tile canvas, zero-pad bottom/right, split; uint8 tiles."""
    height, width = image.shape[:2]
    canvas_h, canvas_w = _optimal_canvas(height, width, max_tiles, tile_size)
    new_h, new_w = _fit_to_canvas(height, width, canvas_h, canvas_w, tile_size)
    canvas = np.zeros((canvas_h, canvas_w, 3), np.uint8)
    canvas[:new_h, :new_w] = _resize(image, new_h, new_w)
    rows, cols = canvas_h // tile_size, canvas_w // tile_size
    aspect_ratio_id = supported_aspect_ratios(max_tiles).index((rows, cols)) + 1
    return Tiles(_split(canvas, rows, cols), aspect_ratio_id, rows * cols)


def mllama_tile(image: np.ndarray, tile_size: int, max_tiles: int, mean, std) -> Tiles:
    """Exactly MllamaImageProcessor (PIL backend) for one image: normalised (num_tiles, t, t, 3) float32."""
    tiles = mllama_tile_uint8(image, tile_size, max_tiles)
    return tiles._replace(pixels=normalize(tiles.pixels, mean, std))


# -------------------------------------------------------------------------------------------- CATTY


def catty_grid(height: int, width: int, tile_size: int, max_tiles: int) -> tuple[int, int]:
    """The grid (rows, cols) whose aspect ratio is closest to the image's (in log space). Ties between
    equal ratios (1x1, 2x2, ...) go to the larger grid while the image has enough pixels to fill it."""
    aspect = math.log(width / height)
    grids = sorted(((r, c) for r in range(1, max_tiles + 1) for c in range(1, max_tiles + 1) if r * c <= max_tiles),
                   key=lambda g: g[0] * g[1])
    best, best_diff = grids[0], abs(aspect - math.log(grids[0][1] / grids[0][0]))
    for rows, cols in grids[1:]:
        diff = abs(aspect - math.log(cols / rows))
        if diff < best_diff - 1e-12 or (abs(diff - best_diff) <= 1e-12
                                         and height * width > 0.5 * tile_size * tile_size * rows * cols):
            best, best_diff = (rows, cols), diff
    return best


def _window_starts(length: int, tile: int, count: int) -> list[int]:
    """`count` windows of `tile` covering [0, length); equal overlap instead of padding or distortion."""
    if count == 1:
        return [0]
    stride = (length - tile) / (count - 1)
    return [round(i * stride) for i in range(count)]


def catty_tile_uint8(image: np.ndarray, tile_size: int, max_tiles: int, thumbnail: bool = True) -> Tiles:
    """POINTS' CATTY: aspect-preserving resize into the closest grid, overlapping sliding-window tiles,
    then a whole-image thumbnail (only when there is more than one tile)."""
    height, width = image.shape[:2]
    rows, cols = catty_grid(height, width, tile_size, max_tiles)
    scale = min(rows * tile_size / height, cols * tile_size / width)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    resized = _resize(image, new_h, new_w)
    # A side shorter than one tile (extreme aspect ratios) is zero-padded like Mllama's canvas.
    canvas = np.zeros((max(new_h, tile_size), max(new_w, tile_size), 3), np.uint8)
    canvas[:new_h, :new_w] = resized
    tiles = [canvas[y:y + tile_size, x:x + tile_size]
             for y in _window_starts(canvas.shape[0], tile_size, rows)
             for x in _window_starts(canvas.shape[1], tile_size, cols)]
    if thumbnail and len(tiles) > 1:
        tiles.append(_resize(image, tile_size, tile_size))
    grid_id = supported_aspect_ratios(max_tiles).index((rows, cols)) + 1
    return Tiles(np.stack(tiles), grid_id, len(tiles))


def catty_tile(image: np.ndarray, tile_size: int, max_tiles: int, mean, std, thumbnail: bool = True) -> Tiles:
    tiles = catty_tile_uint8(image, tile_size, max_tiles, thumbnail)
    return tiles._replace(pixels=normalize(tiles.pixels, mean, std))
