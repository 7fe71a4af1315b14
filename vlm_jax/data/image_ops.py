"""Image decoding and a registry of image ops (big_vision style: `get_image_op(name)(...) -> fn`).

An op maps one decoded (H, W, 3) uint8 image to `Tiles` whose pixels are channels-first float32
(n, 3, H, W), ready to drop into a batch: Mllama keeps the n tiles of one image together; unified models
give each of the n tiles (or the single resized image) its own image slot.
"""
from __future__ import annotations

import io
from typing import Callable

import numpy as np
from PIL import Image, ImageOps

from vlm_jax.data import tiling
from vlm_jax.data.bad_records import BadRecord
from vlm_jax.errors import ConfigError
from vlm_jax.paths import user_path
from vlm_jax.registry import IMAGE_OPS

register_image_op = IMAGE_OPS.register


def get_image_op(name: str, **kwargs) -> Callable[[np.ndarray], tiling.Tiles]:
    """The op's factory called with the geometry (image_size, max_tiles, mean, std, thumbnail)."""
    return IMAGE_OPS.get(name)(**kwargs)


def _to_rgb(image: Image.Image) -> Image.Image:
    """Transparency is composited onto white, as transformers' convert_to_rgb does."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        image = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image).convert("RGB")
    return image.convert("RGB")


def decode_image(data: bytes | str | np.ndarray) -> np.ndarray:
    """Encoded bytes, a file path, or an array -> (H, W, 3) uint8 RGB, EXIF orientation applied.

    Raises BadRecord (missing_image, empty_image, corrupt_image) instead of the many PIL error types.
    """
    if isinstance(data, np.ndarray):
        if data.size == 0:
            raise BadRecord("empty_image", f"array of shape {data.shape}")
        if data.dtype != np.uint8 or data.ndim not in (2, 3) or (data.ndim == 3 and data.shape[-1] != 3):
            raise BadRecord("corrupt_image", f"expected (H, W[, 3]) uint8, got {data.shape} {data.dtype}")
        return np.repeat(data[..., None], 3, -1) if data.ndim == 2 else data
    if isinstance(data, str):
        try:
            data = user_path(data, "image").read_bytes()  # local or gs://
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError, ConfigError):
            raise BadRecord("missing_image", data) from None
    if len(data) == 0:
        raise BadRecord("empty_image", "0 bytes")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # decode now: truncated files fail here, not later
            image = _to_rgb(ImageOps.exif_transpose(image))
    # PIL's decoders raise many unrelated types on hostile input (OSError, SyntaxError, struct.error,
    # DecompressionBombError, ...); any failure to decode one image must only skip that record.
    except Exception as e:  # noqa: BLE001
        raise BadRecord("corrupt_image", f"{type(e).__name__}: {e}".split("\n")[0]) from None
    if 0 in image.size:
        raise BadRecord("empty_image", f"size {image.size}")
    return np.asarray(image)


def _channels_first(tiles: tiling.Tiles, mean, std) -> tiling.Tiles:
    pixels = np.ascontiguousarray(tiles.pixels.transpose(0, 3, 1, 2))  # transpose uint8: 4x cheaper
    return tiles._replace(pixels=tiling.normalize(pixels, mean, std, channel_axis=1))


@register_image_op("mllama_tile")
def mllama_tile(image_size: int, max_tiles: int, mean, std, **_):
    return lambda image: _channels_first(tiling.mllama_tile_uint8(image, image_size, max_tiles), mean, std)


@register_image_op("catty_tile")
def catty_tile(image_size: int, max_tiles: int, mean, std, thumbnail: bool = True, **_):
    return lambda image: _channels_first(
        tiling.catty_tile_uint8(image, image_size, max_tiles, thumbnail), mean, std)


def clip_resize_uint8(image: np.ndarray, size: int) -> np.ndarray:
    """CLIP/LLaVA preprocessing: shortest edge to `size` (bicubic), then a centred size x size crop."""
    height, width = image.shape[:2]
    short, long = (height, width) if height <= width else (width, height)
    new_short, new_long = size, int(size * long / short)
    new_h, new_w = (new_short, new_long) if height <= width else (new_long, new_short)
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), resample=Image.BICUBIC))
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return resized[top:top + size, left:left + size]


@register_image_op("resize")
def resize(image_size: int, mean, std, **_):
    return lambda image: _channels_first(tiling.Tiles(clip_resize_uint8(image, image_size)[None], 1, 1), mean, std)
