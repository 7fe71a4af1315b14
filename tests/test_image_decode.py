"""decode_image: every image mode gives the RGB the file holds (one picture written in many modes), and unusable
files fail with one line naming them."""
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps

from vlm_jax.data import BadImage, BadRecord, decode_image
from vlm_jax.errors import UserError

H, W = 48, 64  # not square: a missed or wrong EXIF rotation changes the shape
JPEG_TOLERANCE = 24  # q95 4:4:4 at the shapes' hard edges (measured max 17); a clipped or blank image is >= 128


def _picture() -> np.ndarray:
    """(H, W, 3) float64 in [0, 1]: smooth gradients, a disc and a square with hard edges."""
    y, x = np.mgrid[0:H, 0:W] / np.array([H - 1, W - 1])[:, None, None]
    rgb = np.stack([x, y, 0.5 + 0.5 * np.sin(6 * x + 3 * y) * (1 - y)], -1)
    rgb[(y - 0.4) ** 2 + (x - 0.3) ** 2 < 0.05] = (0.9, 0.15, 0.1)
    rgb[(abs(y - 0.6) < 0.2) & (abs(x - 0.75) < 0.15)] = (0.1, 0.3, 0.85)
    return rgb


PICTURE = _picture()
GREY = PICTURE @ np.array([0.299, 0.587, 0.114])  # (H, W) in [0, 1]
RGB8, GREY8 = np.rint(PICTURE * 255).astype(np.uint8), np.rint(GREY * 255).astype(np.uint8)
GREY16 = np.rint(GREY * 65535).astype(np.uint16)
ALPHA8 = np.rint(np.linspace(0, 255, W))[None, :].repeat(H, 0).astype(np.uint8)  # transparent left, opaque right


def _save(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def _png(samples: np.ndarray, *chunks: tuple[bytes, bytes]) -> bytes:
    """A minimal PNG writer (PIL cannot write 16-bit colour): (H, W[, C]) uint8/uint16, C in 1..4."""
    channels = 1 if samples.ndim == 2 else samples.shape[2]
    header = struct.pack(">IIBBBBB", samples.shape[1], samples.shape[0], samples.dtype.itemsize * 8,
                         {1: 0, 2: 4, 3: 2, 4: 6}[channels], 0, 0, 0)
    rows = samples.astype(samples.dtype.newbyteorder(">")).reshape(samples.shape[0], -1)
    raw = b"".join(b"\0" + row.tobytes() for row in rows)  # filter type 0 on every row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    body = [(b"IHDR", header), *chunks, (b"IDAT", zlib.compress(raw)), (b"IEND", b"")]
    return b"\x89PNG\r\n\x1a\n" + b"".join(chunk(k, d) for k, d in body)


def _over_white(color: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha[..., None] / 255.0
    color = color if color.ndim == 3 else color[..., None]
    return np.rint(color * a + 255 * (1 - a)).astype(np.uint8).repeat(3 // color.shape[-1], -1)


def _grey3(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[..., None], 3, -1)


def _palette_cases() -> dict:
    quantized = Image.fromarray(RGB8).quantize(colors=64)
    index = np.asarray(quantized)
    palette = np.array(quantized.getpalette()[:3 * 64], np.uint8).reshape(-1, 3)
    alpha_of = np.full(64, 255, np.uint8)
    alpha_of[::3] = 0
    alpha_of[1::3] = 100
    return {
        "P PNG": (_save(quantized, "PNG"), palette[index], 0),
        "P PNG, tRNS alpha per entry": (_save(quantized, "PNG", transparency=alpha_of.tobytes()),
                                        _over_white(palette[index], alpha_of[index]), 1),
    }


def _exif_jpeg() -> bytes:
    """The picture stored rotated 90 degrees anticlockwise, with EXIF orientation 6 ("rotate 90 clockwise")."""
    stored = Image.fromarray(np.ascontiguousarray(np.rot90(RGB8)))
    exif = stored.getexif()
    exif[0x0112] = 6
    return _save(stored, "JPEG", exif=exif.tobytes(), quality=95, subsampling=0)


def _cases() -> dict:
    """name -> (encoded bytes, the RGB the file holds (uint8), tolerance in 1/255 units)."""
    transparent = int(GREY16[int(0.4 * H), int(0.3 * W)])  # the disc's grey value
    rgb16 = np.rint(PICTURE * 65535).astype(np.uint16)
    jpeg = dict(quality=95, subsampling=0)
    return {
        "RGB PNG (8-bit reference)": (_save(Image.fromarray(RGB8), "PNG"), RGB8, 0),
        "L PNG": (_save(Image.fromarray(GREY8), "PNG"), _grey3(GREY8), 0),
        "1 PNG (1-bit)": (_save(Image.fromarray(GREY8 > 127), "PNG"), _grey3((GREY8 > 127) * np.uint8(255)), 0),
        "I;16 PNG (16-bit grey)": (_save(Image.fromarray(GREY16), "PNG"), _grey3(GREY8), 1),
        "I;16B TIFF (16-bit big-endian)": (_save(Image.fromarray(GREY16.astype(">u2")), "TIFF"), _grey3(GREY8), 1),
        "I TIFF (32-bit integer)": (_save(Image.fromarray(GREY16.astype(np.int32)), "TIFF"), _grey3(GREY8), 1),
        "F TIFF (float32 in [0, 1])": (_save(Image.fromarray(GREY.astype(np.float32)), "TIFF"), _grey3(GREY8), 1),
        "I;16 PNG, tRNS grey value": (_png(GREY16, (b"tRNS", struct.pack(">H", transparent))),
                                      _grey3(np.where(GREY16 == transparent, 255, GREY8)), 1),
        "RGB PNG, 16 bits a sample": (_png(rgb16), RGB8, 1),
        "RGBA PNG, 16 bits a sample": (_png(np.dstack([rgb16, np.full((H, W), 65535, np.uint16)])), RGB8, 1),
        "RGBA PNG": (_save(Image.fromarray(np.dstack([RGB8, ALPHA8])), "PNG"), _over_white(RGB8, ALPHA8), 1),
        "LA PNG": (_png(np.dstack([GREY8, ALPHA8])), _over_white(GREY8, ALPHA8), 1),
        **_palette_cases(),
        "CMYK TIFF": (_save(Image.fromarray(RGB8).convert("CMYK"), "TIFF"), RGB8, 0),
        "RGB JPEG": (_save(Image.fromarray(RGB8), "JPEG", **jpeg), RGB8, JPEG_TOLERANCE),
        "CMYK JPEG (Adobe)": (_save(Image.fromarray(RGB8).convert("CMYK"), "JPEG", **jpeg), RGB8, JPEG_TOLERANCE),
        "RGB JPEG, EXIF orientation 6": (_exif_jpeg(), RGB8, JPEG_TOLERANCE),
    }


CASES = _cases()


def max_differences() -> dict[str, int]:
    """name -> max |decoded - expected| in 1/255 units (also printed by the report's one-off script)."""
    return {name: int(np.abs(decode_image(data).astype(int) - expected).max())
            for name, (data, expected, _) in CASES.items()}


@pytest.mark.parametrize("name", list(CASES))
def test_every_mode_decodes_to_the_rgb_it_holds(name):
    data, expected, tolerance = CASES[name]
    decoded = decode_image(data)
    assert decoded.shape == (H, W, 3) and decoded.dtype == np.uint8
    assert np.abs(decoded.astype(int) - expected).max() <= tolerance


def test_8_bit_modes_match_the_transformers_processor():
    """Alpha over white, palettes, CMYK, 1-bit, EXIF: what an exported model's HF image processor is given.
    (For 16-bit grey, 32-bit integer and float files transformers clips to 0/255; decode_image does not.)"""
    image_transforms = pytest.importorskip("transformers.image_transforms")
    compared = 0
    for name, (data, _, _) in CASES.items():
        image = Image.open(io.BytesIO(data))
        if image.mode == "F" or image.mode.startswith("I"):
            continue
        hf = image_transforms.convert_to_rgb(ImageOps.exif_transpose(image), return_numpy=True)
        np.testing.assert_array_equal(decode_image(data), hf, err_msg=name)
        compared += 1
    assert compared == len(CASES) - 5


def test_16_bit_samples_scale_by_1_over_257_rounded():
    every = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    decoded = decode_image(_save(Image.fromarray(every), "PNG"))[..., 0]
    np.testing.assert_array_equal(decoded, np.rint(every / 257))


def test_floats_are_clipped_to_0_1():
    values = np.array([[-0.5, 0.0, 0.25, 1.0, 7.0]], np.float32)
    decoded = decode_image(_save(Image.fromarray(values), "TIFF"))[..., 0]
    np.testing.assert_array_equal(decoded, [[0, 0, 64, 255, 255]])


def test_exif_orientation_turns_the_stored_pixels():
    stored = Image.open(io.BytesIO(_exif_jpeg()))  # PIL alone keeps the stored (W, H) orientation
    stored.load()
    assert stored.size == (H, W)
    np.testing.assert_array_equal(decode_image(_exif_jpeg()), np.rot90(np.asarray(stored), -1))  # turned clockwise


def _bad_files(folder) -> dict:
    """name -> (path, reason)."""
    png = _save(Image.fromarray(RGB8), "PNG")
    (folder / "empty.png").write_bytes(b"")
    (folder / "truncated.png").write_bytes(png[:len(png) // 2])
    (folder / "notes.png").write_text("not a picture\n")
    (folder / "a_folder.png").mkdir()
    (folder / "negative.tif").write_bytes(_save(Image.fromarray(np.full((4, 4), -3, np.int32)), "TIFF"))
    (folder / "nan.tif").write_bytes(_save(Image.fromarray(np.full((4, 4), np.nan, np.float32)), "TIFF"))
    return {"0 bytes": ("empty.png", "empty_image"), "truncated PNG": ("truncated.png", "corrupt_image"),
            "text named .png": ("notes.png", "corrupt_image"), "directory": ("a_folder.png", "missing_image"),
            "missing file": ("nope.png", "missing_image"), "negative 32-bit": ("negative.tif", "unsupported_image"),
            "NaN floats": ("nan.tif", "unsupported_image")}


def test_unusable_files_fail_with_one_line_naming_them(tmp_path):
    for name, (file, reason) in _bad_files(tmp_path).items():
        path = str(tmp_path / file)
        with pytest.raises(BadImage) as e:
            decode_image(path)
        assert isinstance(e.value, UserError) and isinstance(e.value, BadRecord), name  # CLI line; pipeline skip
        message = str(e.value)
        assert e.value.reason == reason and path in message and "\n" not in message, (name, message)


def test_truncated_jpeg_is_never_half_decoded():
    data = CASES["RGB JPEG"][0]
    with pytest.raises(BadImage) as e:
        decode_image(data[:len(data) // 2])
    assert e.value.reason == "corrupt_image" and f"{len(data) // 2}-byte image" in str(e.value)
