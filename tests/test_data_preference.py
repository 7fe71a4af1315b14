"""Preference records: JSONL parsing, embedded preference pairs with injected errors, and batches whose rows 2i /
2i+1 hold the chosen / rejected answer of one prompt (same images, loss on the answers only)."""
import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from vlm_jax.data import (DataConfig, ExamplePreparer, InputSpec, PackingConfig, ShapeConfig, SourceConfig,
                          WorkerConfig, build_pipeline, build_source, get_task, get_template, list_tasks, task_texts,
                          train_sentencepiece)
from vlm_jax.data import tokenizer as tok
from vlm_jax.errors import ConfigError

SPEC = InputSpec("cross_attention", image_size=28, max_tiles=4)


@pytest.fixture(scope="module")
def tokenizer():
    return train_sentencepiece(task_texts(), vocab_size=128)


@pytest.mark.parametrize("task", [t.name for t in list_tasks()])
def test_embedded_pairs_inject_a_deterministic_error_into_the_answer(task):
    sft = build_source(SourceConfig("embedded", task, split="test"))
    pairs = build_source(SourceConfig("embedded_preference", task, split="test"))
    again = build_source(SourceConfig("embedded_preference", task, split="test"))
    rejected = set()
    for i in range(40):
        record, want = pairs[i], sft[i]
        assert record["turns"] == want["turns"][:1] and record["chosen"] == want["turns"][1][1]
        np.testing.assert_array_equal(record["images"][0], want["images"][0])
        assert record["rejected"] != record["chosen"] and record["rejected"] in get_task(task).answers
        if get_task(task).error == "off_by_one":  # a count one off
            assert abs(int(record["rejected"]) - int(record["chosen"])) == 1
        assert again[i]["rejected"] == record["rejected"]
        rejected.add((record["chosen"], record["rejected"]))
    assert len(rejected) > 3


def _answer(tokenizer, ids, mask):
    supervised = ids[mask > 0]
    assert supervised[-1] == tokenizer.special_id(tok.EOT)
    return tokenizer.decode(supervised[:-1])


def test_pair_rows_share_prompt_and_images_and_supervise_only_the_answers(tokenizer):
    cfg = DataConfig(sources=(SourceConfig("embedded_preference", "shapes_color"),),
                     shapes=ShapeConfig(batch_size=6, seq_len=24), workers=WorkerConfig(prefetch_batches=0))
    batch = next(build_pipeline(cfg, tokenizer, SPEC, pairs=True))
    chosen = set(get_task("shapes_color").answers)
    for i in range(3):
        c, r = 2 * i, 2 * i + 1
        for k in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask"):
            np.testing.assert_array_equal(batch[k][c], batch[k][r], err_msg=k)
        start = int(np.argmax(batch["loss_mask"][c]))
        assert start == int(np.argmax(batch["loss_mask"][r]))  # the same prompt, then the answers
        np.testing.assert_array_equal(batch["input_ids"][c, :start], batch["input_ids"][r, :start])
        answers = [_answer(tokenizer, batch["input_ids"][row], batch["loss_mask"][row]) for row in (c, r)]
        assert answers[0] != answers[1] and set(answers) <= chosen
    preparer = ExamplePreparer(SPEC, get_template("simple", tokenizer), cfg.image, cfg.shapes)
    record = build_source(SourceConfig("embedded_preference", "shapes_color"))[0]
    example, reference = preparer.prompt(record)  # greedy-answer accuracy scores against the chosen answer
    assert reference == record["chosen"] and not example["loss_mask"].any()
    with pytest.raises(ConfigError, match="packing"):
        build_pipeline(dataclasses.replace(cfg, packing=PackingConfig(True)), tokenizer, SPEC, pairs=True)
    with pytest.raises(ConfigError, match="even"):
        build_pipeline(dataclasses.replace(cfg, shapes=ShapeConfig(batch_size=5, seq_len=24)), tokenizer,
                       SPEC, pairs=True)


def test_jsonl_preference_records_and_wrong_kinds_are_counted(tokenizer, tmp_path):
    Image.fromarray(np.full((20, 20, 3), 90, np.uint8)).save(tmp_path / "a.png")
    prompt = [{"from": "human", "value": "<image>What color is the shape?"}]
    lines = [{"image": "a.png", "conversations": prompt, "chosen": "red", "rejected": "blue"},
             {"image": "a.png", "conversations": prompt + [{"from": "gpt", "value": "red"}]},  # an SFT record
             {"image": "a.png", "conversations": prompt, "chosen": "red", "rejected": 3},
             {"image": "a.png", "conversations": prompt + [{"from": "gpt", "value": "red"}], "chosen": "a",
              "rejected": "b"}]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    source = SourceConfig("jsonl", "p", path=str(tmp_path / "p.jsonl"))
    cfg = DataConfig(sources=(source,), eval_sources=(source,), shapes=ShapeConfig(batch_size=8, seq_len=24),
                     workers=WorkerConfig(prefetch_batches=0), max_bad_fraction=1.0)
    it = build_pipeline(cfg, tokenizer, SPEC, train=False, pairs=True)
    (batch,) = list(it)
    assert it.get_state()["records"]["bad"] == {"record_kind": 1, "bad_json": 2}
    assert [_answer(tokenizer, batch["input_ids"][r], batch["loss_mask"][r]) for r in (0, 1)] == ["red", "blue"]
    assert not batch["segment_ids"][2:].any()  # the unusable records' pairs are empty rows
    sft = build_pipeline(cfg, tokenizer, SPEC, train=False)
    list(sft)
    assert sft.get_state()["records"]["bad"] == {"record_kind": 1, "bad_json": 2}
