"""Sources (JSONL, TFDS ArrayRecord, embedded) and bad-input robustness with exact per-reason counts."""
import io
import json

import numpy as np
import pytest
from PIL import Image

from vlm_jax.data import (DataConfig, InputSpec, ShapeConfig, SourceConfig, TooManyBadRecords, WorkerConfig,
                          build_pipeline, build_source, build_tfds_dataset, get_task, list_tasks, task_texts,
                          train_sentencepiece)
from vlm_jax.data.sources.embedded import EmbeddedSource

SPEC = InputSpec("cross_attention", image_size=28, max_tiles=4)


def _png(value: int, size=(12, 16)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((*size, 3), value, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


# reason -> (count, writer(index, folder) -> the line's bytes). 100 of 1000 lines are bad.
def _bad_lines():
    def image_line(name, data):
        def write(i, folder):
            (folder / f"{name}{i}.png").write_bytes(data)
            return json.dumps({"image": f"{name}{i}.png", "text": "fine caption"}).encode()
        return write
    good_png = _png(9)
    nan_tiff = io.BytesIO()
    Image.fromarray(np.full((12, 16), np.nan, np.float32)).save(nan_tiff, "TIFF")
    return {
        "bad_json": (15, lambda i, folder: b'{"image": "x.png", "text": '),
        "invalid_utf8": (10, lambda i, folder: b'{"image": "g.png", "text": "caf\xe9"}'),
        "empty_text": (15, lambda i, folder: json.dumps({"image": "g.png", "text": "   "}).encode()),
        "missing_image": (10, lambda i, folder: json.dumps({"image": f"nope{i}.png", "text": "x"}).encode()),
        "unsupported_image": (5, image_line("nan", nan_tiff.getvalue())),
        "corrupt_image": (15, image_line("noise", b"\x89PNG\r\n garbage" * 3)),
        "empty_image": (10, image_line("empty", b"")),
        "too_long": (10, lambda i, folder: json.dumps({"image": "g.png", "text": "word " * 200}).encode()),
        # truncated PNG: half of a valid file
        "corrupt_image#truncated": (10, image_line("trunc", good_png[:len(good_png) // 2])),
    }


@pytest.fixture(scope="module")
def fuzz_jsonl(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    (folder / "g.png").write_bytes(_png(200))
    rng = np.random.default_rng(0)
    lines, expected = [], {}
    for reason, (count, write) in _bad_lines().items():
        expected[reason.split("#")[0]] = expected.get(reason.split("#")[0], 0) + count
        lines += [write(i, folder) for i in range(count)]
    lines += [json.dumps({"image": "g.png", "text": f"caption {i}"}).encode() for i in range(1000 - len(lines))]
    lines = [lines[i] for i in rng.permutation(len(lines))]
    (folder / "data.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return str(folder / "data.jsonl"), expected


@pytest.fixture(scope="module")
def tokenizer():
    return train_sentencepiece(task_texts() + ["fine caption word"] * 5, vocab_size=128)


def _fuzz_config(path, max_bad_fraction):
    source = (SourceConfig("jsonl", "fuzz", path=path),)
    return DataConfig(sources=source, eval_sources=source, max_bad_fraction=max_bad_fraction,
                      shapes=ShapeConfig(batch_size=50, seq_len=40, overflow="drop"),
                      workers=WorkerConfig(read_threads=2, prefetch_batches=0))


def test_fuzz_counts_every_reason_exactly(fuzz_jsonl, tokenizer):
    path, expected = fuzz_jsonl
    it = build_pipeline(_fuzz_config(path, 0.15), tokenizer, SPEC, train=False)
    batches = list(it)
    assert len(batches) == 20
    records = it.get_state()["records"]
    assert records["bad"] == expected and sum(expected.values()) == 100
    assert records["good"] == 900
    assert sum(int((b["segment_ids"].max(1) > 0).sum()) for b in batches) == 900


def test_fuzz_over_threshold_stops_with_one_line(fuzz_jsonl, tokenizer):
    path, _ = fuzz_jsonl
    cfg = _fuzz_config(path, 0.05)
    with pytest.raises(TooManyBadRecords) as e:
        it = build_pipeline(cfg, tokenizer, SPEC)  # training: judged after bad_fraction_min_records
        for _ in range(100):
            next(it)
    message = str(e.value)
    assert "\n" not in message and "data.max_bad_fraction=5.0%" in message


def test_truncation_is_counted(tokenizer, fuzz_jsonl):
    path, _ = fuzz_jsonl
    cfg = DataConfig(sources=(SourceConfig("jsonl", "fuzz", path=path),), max_bad_fraction=0.5,
                     shapes=ShapeConfig(batch_size=50, seq_len=40, overflow="truncate"),
                     workers=WorkerConfig(prefetch_batches=0))
    it = build_pipeline(cfg, tokenizer, SPEC)
    for _ in range(4):
        batch = next(it)
    records = it.get_state()["records"]
    assert records["truncated"] > 0 and "too_long" not in records["bad"]
    assert batch["input_ids"].shape == (50, 40)


def test_jsonl_captions_and_conversations(tmp_path):
    (tmp_path / "a.png").write_bytes(_png(10))
    lines = [{"image": "a.png", "text": "a grey square"},
             {"images": ["a.png", "a.png"], "conversations": [
                 {"from": "system", "value": "Be brief."},
                 {"from": "human", "value": "<image>\nWhat is it? <image>"}, {"from": "gpt", "value": "Grey."},
                 {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "Yes."}]}]
    (tmp_path / "d.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n\n")
    source = build_source(SourceConfig("jsonl", "d", path=str(tmp_path / "d.jsonl")))
    assert len(source) == 2  # the blank line is not a record
    assert source[0]["turns"] == [("user", ""), ("assistant", "a grey square")]
    assert source[0]["images"] == [str(tmp_path / "a.png")]
    assert [r for r, _ in source[1]["turns"]] == ["system", "user", "assistant", "user", "assistant"]
    assert len(source[1]["images"]) == 2


def test_tfds_array_record_roundtrip(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(_png(30))
    lines = [{"image": "img/a.png", "text": f"caption {i}"} for i in range(5)] + [
        {"image": "img/missing.png", "text": "gone"},
        {"images": ["img/a.png"], "conversations": [{"from": "human", "value": "<image>Q?"},
                                                     {"from": "gpt", "value": "A."}]}]
    (tmp_path / "train.jsonl").write_text("\n".join(map(json.dumps, lines)))
    skipped = build_tfds_dataset("vlm_fixture", {"train": str(tmp_path / "train.jsonl")}, str(tmp_path / "tfds"))
    assert skipped == {"missing_image": 1}
    assert list((tmp_path / "tfds" / "vlm_fixture" / "1.0.0").glob("*.array_record-*"))
    source = build_source(SourceConfig("tfds", "vlm_fixture", path=str(tmp_path / "tfds"), split="train[:100%]"))
    assert len(source) == 6
    records = [source[i] for i in range(6)]
    assert all(r["images"][0] == _png(30) for r in records)  # encoded bytes, stored as found
    captions = sorted(r["turns"][-1][1] for r in records)
    assert captions == ["A."] + [f"caption {i}" for i in range(5)]


def test_embedded_tasks_deterministic_and_held_out_disjoint():
    names = {t.name for t in list_tasks()}
    assert {"digits_qa", "digits_caption", "shapes_count", "shapes_color", "shapes_position", "ocr_word",
            "chart_tallest", "chart_count"} <= names
    for task in list_tasks():
        train, test = EmbeddedSource(task.name, "train", 50), EmbeddedSource(task.name, task.held_out, 50)
        a, b = train[7], EmbeddedSource(task.name, "train", 50)[7]
        np.testing.assert_array_equal(a["images"][0], b["images"][0])
        answer = a["turns"][-1][1]
        assert answer in task.answers and len(answer.split()) == 1  # short, closed-set answers
        train_images = {train[i]["images"][0].tobytes() for i in range(50)}
        assert not any(test[i]["images"][0].tobytes() in train_images for i in range(50)), task.name
    digits = get_task("digits_qa")
    assert digits.size("train") + digits.size("test") == 1797 and digits.question == "What digit is this?"
