"""Image files and bytes -> (H, W, 3) uint8 RGB: the one decoder behind the data sources, the pipeline and
inference (`vlm-jax generate`, the Answerer).

Every mode PIL opens maps to RGB by a stated rule; nothing is clipped to 0/255 or blanked silently:
- 16-bit grey (I;16, I;16B, ...) and 32-bit integer (I) samples are 16-bit values, scaled by 1/257 and rounded;
  mode I values outside 0..65535 have no agreed scale and are refused.
- Float (F) samples are [0, 1] values in the file's own colour space (no gamma change), clipped to [0, 1];
  NaN or infinity is refused.
- 16-bit colour PNGs (RGB/RGBA/LA, 48 or 64 bits a pixel): PIL keeps each sample's high byte, at most 1/255
  below v/257 -- exactly the pixels transformers' processors see.
- Transparency (RGBA, LA, PA, premultiplied alpha, a transparent palette entry or grey value) is composited onto
  white, as transformers' `convert_to_rgb` does, so an exported model sees what its HF processor gives it
  (transformers' `load_image` instead drops alpha, keeping the colour under it).
- 1-bit, L, P, CMYK (Adobe JPEGs included) and YCbCr go through PIL's conversion; colour profiles are not applied
  (nor does transformers apply them); animations give their first frame.
- EXIF orientation is applied (`ImageOps.exif_transpose`), as transformers' `load_image` does.

Anything unusable raises `BadImage`: the pipeline counts it as a bad record, the CLI prints its one line.
Truncated files fail as a whole (PIL's `ImageFile.LOAD_TRUNCATED_IMAGES` stays False): never half a picture.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vlm_jax.data.bad_records import BadRecord
from vlm_jax.errors import ConfigError, UserError
from vlm_jax.paths import user_path


class BadImage(BadRecord, UserError):
    """An image that cannot be used; the one-line message names the file (or the bytes) and what is wrong."""

    def __init__(self, reason: str, source: str, problem: str):
        super().__init__(reason, f"{source}: {problem}")


def read_image_bytes(path: str) -> bytes:
    """The encoded bytes of a local or gs:// image file."""
    try:
        return user_path(path, "image").read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        raise BadImage("missing_image", path, "no such file") from None
    except IsADirectoryError:
        raise BadImage("missing_image", path, "a directory, not an image file") from None
    except (OSError, ConfigError) as e:
        raise BadImage("missing_image", path, f"cannot be read ({_first_line(e)})") from None


def decode_image(data: bytes | str | np.ndarray) -> np.ndarray:
    """Encoded bytes, a file path, or an (H, W[, 3]) uint8 array -> (H, W, 3) uint8 RGB (see the module doc)."""
    if isinstance(data, np.ndarray):
        if data.size == 0:
            raise BadImage("empty_image", "array", f"shape {data.shape}")
        if data.dtype != np.uint8 or data.ndim not in (2, 3) or (data.ndim == 3 and data.shape[-1] != 3):
            raise BadImage("unsupported_image", "array", f"expected (H, W[, 3]) uint8, got {data.shape} {data.dtype}")
        return np.repeat(data[..., None], 3, -1) if data.ndim == 2 else data
    source = data if isinstance(data, str) else f"{len(data)}-byte image"
    if isinstance(data, str):
        data = read_image_bytes(data)
    if not data:
        raise BadImage("empty_image", source, "0 bytes")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # decode now: a truncated file fails here, not later
            image = ImageOps.exif_transpose(image)
    except UnidentifiedImageError:
        raise BadImage("corrupt_image", source, "not an image in a format PIL reads") from None
    # PIL's decoders raise many unrelated types on hostile input (OSError, SyntaxError, struct.error,
    # DecompressionBombError, ...); any failure to decode one image must only skip that record.
    except Exception as e:  # noqa: BLE001
        raise BadImage("corrupt_image", source, f"cannot be decoded ({_first_line(e)})") from None
    if 0 in image.size:
        raise BadImage("empty_image", source, f"size {image.size}")
    return _to_rgb(_to_8bit(image, source) if image.mode == "F" or image.mode.startswith("I") else image, source)


def _to_8bit(image: Image.Image, source: str) -> Image.Image:
    """I;16*, I (16-bit values) and F ([0, 1]) -> L, or LA when the file names a transparent grey value."""
    values = np.asarray(image)
    if image.mode == "F":
        if not np.isfinite(values).all():
            raise BadImage("unsupported_image", source, "float samples include NaN or infinity")
        grey = np.rint(np.clip(values, 0, 1) * 255).astype(np.uint8)
    else:
        low, high = int(values.min()), int(values.max())
        if low < 0 or high > 65535:
            raise BadImage("unsupported_image", source, f"integer samples span {low}..{high}, outside the 16-bit "
                           "range 0..65535 this mode is read as; save the image with 8- or 16-bit samples")
        grey = ((values.astype(np.uint32) * 2 + 257) // 514).astype(np.uint8)  # round(v / 257), exactly
    out = Image.fromarray(grey)
    transparent = image.info.get("transparency")
    if isinstance(transparent, int):
        out = Image.merge("LA", (out, Image.fromarray(np.where(values == transparent, 0, 255).astype(np.uint8))))
    return out


def _to_rgb(image: Image.Image, source: str) -> np.ndarray:
    has_alpha = {"A", "a"} & set(image.getbands()) or image.info.get("transparency") is not None
    try:
        if not has_alpha:
            return np.asarray(image.convert("RGB"))
        image = image.convert("RGBA")
    except ValueError as e:  # a mode PIL cannot turn into RGB
        raise BadImage("unsupported_image", source, f"mode {image.mode} ({_first_line(e)})") from None
    white = Image.new("RGBA", image.size, (255, 255, 255, 255))
    return np.asarray(Image.alpha_composite(white, image).convert("RGB"))


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__
