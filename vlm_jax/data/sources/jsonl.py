"""JSONL records read in place: plain captions and LLaVA-style conversations.

    {"image": "a.jpg", "text": "a cat on a mat"}
    {"images": ["a.jpg"], "conversations": [{"from": "human", "value": "<image>\\nWhat is it?"},
                                            {"from": "gpt", "value": "A cat."}]}
    {"image": "a.jpg", "conversations": [{"from": "human", "value": "What is it?"}],
     "chosen": "A cat.", "rejected": "A dog."}                           (a preference record: prompt turns only)

Image paths are resolved against `image_root` (default: the JSONL file's folder) and read only when the
example is prepared, so a missing file costs one record, not the run. The file, the images and image_root
may be local or on an object store (gs://); an absolute or gs:// image path stands alone.
"""
from __future__ import annotations

import json
import os

import numpy as np

from vlm_jax.config import SourceConfig
from vlm_jax.data.bad_records import BadRecord
from vlm_jax.paths import is_remote, resolve_from, user_path
from vlm_jax.registry import SOURCES

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def parse_record(line: bytes, image_root) -> dict:
    """One JSONL line -> {"images": [path, ...], "turns": [(role, text), ...]}; BadRecord on any defect."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRecord("invalid_utf8", f"byte {e.start}") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadRecord("bad_json", e.msg) from None
    if not isinstance(obj, dict):
        raise BadRecord("bad_json", "a line must hold a JSON object")
    images = obj.get("images", [obj["image"]] if obj.get("image") else [])
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise BadRecord("bad_json", "'image' must be a path string, 'images' a list of them")
    if "chosen" in obj or "rejected" in obj:
        return {**_preference(obj), "images": _image_paths(images, image_root)}
    if "conversations" in obj:
        turns = _conversation_turns(obj["conversations"])
    elif isinstance(obj.get("text"), str):
        turns = [("user", ""), ("assistant", obj["text"])]
    else:
        raise BadRecord("bad_json", "needs 'text' (a caption) or 'conversations'")
    if not any(role == "assistant" and text.strip() for role, text in turns):
        raise BadRecord("empty_text", "no non-empty caption or answer")
    return {"images": _image_paths(images, image_root), "turns": turns}


def format_record(images: list[str], turns: list[tuple[str, str]], **extra) -> str:
    """The JSONL line `parse_record` reads back as {"images": images, "turns": turns} (with `image_root` the
    folder relative image paths are written against); `extra` fields are kept for people and ignored here."""
    return json.dumps({"images": images, "conversations": [{"from": role, "value": text} for role, text in turns],
                       **extra}, ensure_ascii=False)


def _image_paths(images: list[str], image_root) -> list[str]:
    try:
        return [str(resolve_from(image_root, p, "image")) for p in images]
    except ValueError as e:  # an image URI of a scheme we cannot read
        raise BadRecord("missing_image", str(e)) from None


def _preference(obj: dict) -> dict:
    """The prompt turns and both answers of a preference record."""
    turns = _conversation_turns(obj.get("conversations", []))
    if turns and turns[-1][0] == "assistant":
        raise BadRecord("bad_json", "a preference record's 'conversations' end with the prompt (a user turn); "
                        "the answers go in 'chosen' and 'rejected'")
    answers = [obj.get(k) for k in ("chosen", "rejected")]
    if not all(isinstance(a, str) for a in answers):
        raise BadRecord("bad_json", "'chosen' and 'rejected' must both be strings")
    if not all(a.strip() for a in answers):
        raise BadRecord("empty_text", "an empty 'chosen' or 'rejected' answer")
    return {"turns": turns, "chosen": answers[0], "rejected": answers[1]}


def _conversation_turns(conversations) -> list[tuple[str, str]]:
    if not isinstance(conversations, list):
        raise BadRecord("bad_json", "'conversations' must be a list")
    turns = []
    for turn in conversations:
        if not isinstance(turn, dict) or turn.get("from") not in _ROLES or not isinstance(turn.get("value"), str):
            raise BadRecord("bad_json", "each turn needs 'from' (human/gpt/system) and a string 'value'")
        turns.append((_ROLES[turn["from"]], turn["value"]))
    return turns


@SOURCES.register("jsonl")
def jsonl_source(cfg: SourceConfig) -> "JsonlSource":
    return JsonlSource(cfg.path, cfg.image_root)


class JsonlSource:
    """Random access over the non-blank lines of a JSONL file (line offsets indexed once, read by pread)."""

    def __init__(self, path: str, image_root: str = ""):
        self.path = user_path(path, "path")
        self.image_root = user_path(image_root, "image_root") if image_root else self.path.parent
        data = self.path.read_bytes()
        newlines = np.flatnonzero(np.frombuffer(data, np.uint8) == ord("\n"))
        starts = np.concatenate([[0], newlines + 1])
        ends = np.concatenate([newlines, [len(data)]])
        nonblank = [i for i, (s, e) in enumerate(zip(starts, ends)) if data[s:e].strip()]
        self._starts, self._ends = starts[nonblank], ends[nonblank]
        self._fd = None

    def __getstate__(self):  # file descriptors do not cross process boundaries
        return {**self.__dict__, "_fd": None}

    def __len__(self) -> int:
        return len(self._starts)

    def __getitem__(self, index: int) -> dict:
        start, end = int(self._starts[index]), int(self._ends[index])
        return parse_record(self._read(start, end - start), self.image_root)

    def _read(self, start: int, size: int) -> bytes:
        if is_remote(self.path):  # one ranged read per record
            with self.path.open("rb") as f:
                f.seek(start)
                return f.read(size)
        if self._fd is None:  # a local file: pread is positional, so reader threads share one descriptor
            self._fd = os.open(self.path, os.O_RDONLY)
        return os.pread(self._fd, size, start)

    def __repr__(self):
        return f"JsonlSource({self.path}, {len(self)} records)"
