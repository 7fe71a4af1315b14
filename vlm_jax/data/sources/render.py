"""Procedural images drawn with PIL: coloured shapes, rendered words, bar charts.

Each renderer takes a numpy Generator and returns (image (S, S, 3) uint8, answer). Answers are single
words or numbers; every visual property a question asks about is sampled with clear margins so the tasks
are learnable by a tiny model.
"""
from __future__ import annotations

import functools

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SIZE = 64
COLORS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 90, 230),
    "yellow": (230, 210, 40), "purple": (150, 60, 200), "orange": (240, 140, 30),
}
KINDS = ("circle", "square", "triangle")
POSITIONS = ("left", "right", "top", "bottom")
WORDS = ("cat", "dog", "sun", "red", "box", "car", "sky", "hat", "cup", "map", "pen", "key",
         "tree", "fish", "bird", "moon", "star", "book", "door", "lamp", "ship", "rain", "milk", "frog")


def _canvas(rng: np.random.Generator) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    grey = int(rng.integers(0, 48))
    image = Image.new("RGB", (SIZE, SIZE), (grey, grey, grey))
    return image, ImageDraw.Draw(image)


def _shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, radius: float, color):
    if kind == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=color)
    elif kind == "square":
        draw.rectangle((cx - radius, cy - radius, cx + radius, cy + radius), fill=color)
    else:
        draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=color)


def _random_color(rng) -> tuple[str, tuple[int, int, int]]:
    name = str(rng.choice(list(COLORS)))
    return name, COLORS[name]


def shapes_count(rng) -> tuple[np.ndarray, str]:
    """1-5 shapes in distinct cells of a 3x3 grid, so none overlap."""
    image, draw = _canvas(rng)
    count = int(rng.integers(1, 6))
    cell = SIZE / 3
    for c in rng.choice(9, size=count, replace=False):
        cx, cy = (c % 3 + 0.5) * cell + rng.uniform(-2, 2), (c // 3 + 0.5) * cell + rng.uniform(-2, 2)
        _shape(draw, str(rng.choice(KINDS)), cx, cy, rng.uniform(5, 7.5), _random_color(rng)[1])
    return np.asarray(image), str(count)


def _one_shape(rng, cx=None, cy=None) -> tuple[np.ndarray, str, str]:
    image, draw = _canvas(rng)
    kind, (color, rgb) = str(rng.choice(KINDS)), _random_color(rng)
    radius = rng.uniform(9, 14)
    cx = rng.uniform(radius + 2, SIZE - radius - 2) if cx is None else cx
    cy = rng.uniform(radius + 2, SIZE - radius - 2) if cy is None else cy
    _shape(draw, kind, cx, cy, radius, rgb)
    return np.asarray(image), kind, color


def shapes_color(rng) -> tuple[np.ndarray, str]:
    image, _, color = _one_shape(rng)
    return image, color


def shapes_kind(rng) -> tuple[np.ndarray, str]:
    image, kind, _ = _one_shape(rng)
    return image, kind


def shapes_position(rng) -> tuple[np.ndarray, str]:
    """The shape sits near the middle of one edge; the other coordinate stays central."""
    where = str(rng.choice(POSITIONS))
    near, centre = rng.uniform(13, 18), SIZE / 2 + rng.uniform(-4, 4)
    cx, cy = {"left": (near, centre), "right": (SIZE - near, centre),
              "top": (centre, near), "bottom": (centre, SIZE - near)}[where]
    image, _, _ = _one_shape(rng, cx, cy)
    return image, where


@functools.lru_cache(maxsize=8)
def _font(size: int):
    return ImageFont.load_default(size=size)


def ocr_word(rng) -> tuple[np.ndarray, str]:
    image, draw = _canvas(rng)
    word = str(rng.choice(WORDS))
    font = _font(int(rng.integers(16, 21)))
    left, top, right, bottom = draw.textbbox((0, 0), word, font=font)
    x = rng.uniform(2 - left, SIZE - 2 - right)
    y = rng.uniform(2 - top, SIZE - 2 - bottom)
    draw.text((x, y), word, font=font, fill=tuple(int(v) for v in rng.integers(170, 256, size=3)))
    return np.asarray(image), word


def _bars(rng, heights, colors) -> np.ndarray:
    image, draw = _canvas(rng)
    width = (SIZE - 8) / len(heights)
    draw.line((2, SIZE - 4, SIZE - 2, SIZE - 4), fill=(200, 200, 200))
    for i, (h, c) in enumerate(zip(heights, colors)):
        x0 = 4 + i * width + 1
        draw.rectangle((x0, SIZE - 4 - h, x0 + width - 3, SIZE - 5), fill=c)
    return np.asarray(image)


def chart_tallest(rng) -> tuple[np.ndarray, str]:
    """3 bars in distinct colours; the tallest beats the runner-up by at least 8 px."""
    names = [str(n) for n in rng.choice(list(COLORS), size=3, replace=False)]
    heights = rng.uniform(8, 40, size=3)
    tallest = int(rng.integers(3))
    heights[tallest] = heights.max() + rng.uniform(8, 16)
    return _bars(rng, heights, [COLORS[n] for n in names]), names[tallest]


def chart_count(rng) -> tuple[np.ndarray, str]:
    count = int(rng.integers(2, 6))
    _, rgb = _random_color(rng)
    return _bars(rng, rng.uniform(10, 52, size=count), [rgb] * count), str(count)
