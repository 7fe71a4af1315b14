"""Datasets shipped with the package: real handwritten digits (scikit-learn) and procedural PIL renders, as SFT
records (source kind `embedded`) or as preference pairs with an injected error (`embedded_preference`).

Every task has a fixed, disjoint held-out split ("test"): digits by a seeded permutation of the 1797
scans, procedural tasks by drawing the test split from a different random stream. Examples are a pure
function of (task, split, index), so they are identical on every machine and in every worker.
"""
from __future__ import annotations

import functools
import zlib
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image

from vlm_jax.config import SourceConfig
from vlm_jax.data.sources import render
from vlm_jax.registry import SOURCES

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_SIZE = 32  # the 8x8 scans are upscaled to this side
_DIGITS_TEST = 360  # ~20% of 1797


@dataclass(frozen=True)
class EmbeddedTask:
    name: str
    question: str  # "" for captioning: the image alone is the prompt
    answers: tuple[str, ...]  # the closed set of possible answers
    split_sizes: tuple[tuple[str, int], ...]  # (split, default number of examples)
    held_out: str = "test"
    procedural: bool = True  # False: real data, so a split cannot grow beyond its default size
    # How a preference pair's rejected answer is made from the correct one (Llama 3-V's synthetic errors):
    # "swap" = another answer of the closed set (a wrong digit, colour, word, position); "off_by_one" = a count
    # one too high or too low.
    error: str = "swap"

    def size(self, split: str) -> int:
        return dict(self.split_sizes)[split]


_TASKS: dict[str, tuple[EmbeddedTask, Callable]] = {}


def _register(task: EmbeddedTask, loader: Callable[[str], Callable[[int], tuple[np.ndarray, str]]]):
    _TASKS[task.name] = (task, loader)


def list_tasks() -> list[EmbeddedTask]:
    """All embedded tasks; each names its held-out split (`task.held_out`) and split sizes."""
    return [task for task, _ in _TASKS.values()]


def get_task(name: str) -> EmbeddedTask:
    if name not in _TASKS:
        raise ValueError(f"unknown embedded task '{name}'; choose from {sorted(_TASKS)}")
    return _TASKS[name][0]


def task_texts(names: list[str] | None = None) -> list[str]:
    """Every question and answer of the given tasks (all by default): a tokenizer-training corpus."""
    tasks = [get_task(n) for n in names] if names else list_tasks()
    return [t.question for t in tasks if t.question] + [a for t in tasks for a in t.answers]


@SOURCES.register("embedded")
def embedded_source(cfg: SourceConfig) -> "EmbeddedSource":
    return EmbeddedSource(cfg.name, cfg.split, cfg.size)


class EmbeddedSource:
    """Random access to one split of one task: {"images": [(H, W, 3) uint8], "turns": [...]}."""

    def __init__(self, name: str, split: str, size: int = 0):
        task, loader = get_task(name), _TASKS[name][1]
        sizes = dict(task.split_sizes)
        if split not in sizes:
            raise ValueError(f"embedded task '{name}' has splits {sorted(sizes)}, not '{split}'")
        if not task.procedural and size > sizes[split]:
            raise ValueError(f"embedded task '{name}' split '{split}' has only {sizes[split]} examples, asked {size}")
        self.task, self.split, self._length = task, split, size or sizes[split]
        self._example = loader(split)

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self._length:
            raise IndexError(index)
        image, answer = self._example(index)
        return {"images": [image], "turns": [("user", "<image>" + self.task.question), ("assistant", answer)]}

    def __repr__(self):
        return f"EmbeddedSource({self.task.name}/{self.split}, {self._length} examples)"


EMBEDDED_KINDS = ("embedded", "embedded_preference")  # sources whose texts the embedded tokenizer covers


def wrong_answer(task: EmbeddedTask, answer: str, rng: np.random.Generator) -> str:
    """A plausible error injected into the correct `answer`, by the task's `error` rule."""
    others = [a for a in task.answers if a != answer]
    if task.error == "off_by_one":
        near = [a for a in others if abs(int(a) - int(answer)) == 1]
        return near[int(rng.integers(len(near)))]
    return others[int(rng.integers(len(others)))]


@SOURCES.register("embedded_preference")
def embedded_preference_source(cfg: SourceConfig) -> "EmbeddedPreferenceSource":
    return EmbeddedPreferenceSource(cfg.name, cfg.split, cfg.size)


class EmbeddedPreferenceSource(EmbeddedSource):
    """Preference pairs from an embedded task: {"images", "turns" (the question), "chosen" (the correct answer),
    "rejected" (`wrong_answer` of it)}; the error is a pure function of (task, split, index)."""

    def __getitem__(self, index: int) -> dict:
        record = super().__getitem__(index)
        (prompt, (_, answer)) = record["turns"]
        rng = np.random.default_rng([zlib.crc32(self.task.name.encode()), zlib.crc32(self.split.encode()), index])
        return {"images": record["images"], "turns": [prompt], "chosen": answer,
                "rejected": wrong_answer(self.task, answer, rng)}

    def __repr__(self):
        return f"EmbeddedPreferenceSource({self.task.name}/{self.split}, {self._length} pairs)"


# -------------------------------------------------------------------------------------------- digits


@functools.lru_cache(maxsize=1)
def _digit_splits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from sklearn.datasets import load_digits  # imported here: ~1 s, only needed by the digits tasks
    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)
    order = np.random.default_rng(0).permutation(len(images))
    test, train = order[:_DIGITS_TEST], order[_DIGITS_TEST:]
    return {"train": (images[train], digits.target[train]), "test": (images[test], digits.target[test])}


def _digit_example(images: np.ndarray, labels: np.ndarray, words: bool, index: int) -> tuple[np.ndarray, str]:
    gray = np.asarray(Image.fromarray(images[index]).resize((DIGIT_SIZE, DIGIT_SIZE), Image.BICUBIC))
    label = int(labels[index])
    return np.repeat(gray[..., None], 3, -1), DIGIT_WORDS[label] if words else str(label)


def _digits_loader(words: bool):
    # The split's arrays travel with the source into worker processes, so workers never import sklearn.
    return lambda split: functools.partial(_digit_example, *_digit_splits()[split], words)


_DIGIT_SIZES = (("train", 1797 - _DIGITS_TEST), ("test", _DIGITS_TEST))
_register(EmbeddedTask("digits_qa", "What digit is this?", tuple(map(str, range(10))), _DIGIT_SIZES,
                        procedural=False),
          _digits_loader(words=False))
_register(EmbeddedTask("digits_caption", "", DIGIT_WORDS, _DIGIT_SIZES, procedural=False),
          _digits_loader(words=True))


# ---------------------------------------------------------------------------------------- procedural


def _procedural_example(draw: Callable, salt: int, split: str, index: int) -> tuple[np.ndarray, str]:
    split_stream = {"train": 0, "test": 1}[split]
    return draw(np.random.default_rng([salt, split_stream, index]))


def _procedural(name: str, question: str, answers, draw: Callable, train: int = 5000, test: int = 500,
                error: str = "swap"):
    salt = zlib.crc32(name.encode())
    _register(EmbeddedTask(name, question, tuple(answers), (("train", train), ("test", test)), error=error),
              lambda split: functools.partial(_procedural_example, draw, salt, split))


_procedural("shapes_count", "How many shapes are there?", map(str, range(1, 6)), render.shapes_count,
            error="off_by_one")
_procedural("shapes_color", "What color is the shape?", render.COLORS, render.shapes_color)
_procedural("shapes_kind", "What shape is this?", render.KINDS, render.shapes_kind)
_procedural("shapes_position", "Where is the shape?", render.POSITIONS, render.shapes_position)
_procedural("ocr_word", "What word is written?", render.WORDS, render.ocr_word)
_procedural("chart_tallest", "Which bar is the tallest?", render.COLORS, render.chart_tallest)
_procedural("chart_count", "How many bars are there?", map(str, range(2, 6)), render.chart_count,
            error="off_by_one")
