"""The Grain pipeline: batch contract, packing, determinism, exact resume, re-sharding, worker processes."""
import json

import numpy as np
import pytest

from vlm_jax.data import (DataConfig, ExamplePreparer, ImageConfig, InputSpec, PackingConfig, ShapeConfig,
                          SourceConfig, WorkerConfig, build_pipeline, get_template, register_source, reshard_states,
                          task_texts, train_sentencepiece)
from vlm_jax.data import tokenizer as tok

SPEC = InputSpec("cross_attention", image_size=28, max_tiles=4)


class CountingSource:
    """Record i is captioned with its own number, so every sample in a batch can be identified."""

    def __init__(self, size: int):
        self.size = size

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        image = np.full((20 + i % 40, 30, 3), i % 251, np.uint8)  # 1 or 2 tiles, varied
        images, question = ([image], "<image>How many?") if i % 3 else ([image, image[::-1]], "<image>How <image>many?")
        return {"images": images, "turns": [("user", question), ("assistant", str(i))]}


register_source("counting")(lambda cfg: CountingSource(cfg.size))


@pytest.fixture(scope="module")
def tokenizer():
    return train_sentencepiece(task_texts() + ["How many?"] * 5, vocab_size=128)


def counting_config(**overrides) -> DataConfig:
    base = dict(sources=(SourceConfig("counting", "n", size=100_000),), seed=3,
                shapes=ShapeConfig(batch_size=3, seq_len=64, max_images=4), packing=PackingConfig(True),
                workers=WorkerConfig(prefetch_batches=0))
    return DataConfig(**{**base, **overrides})


def sample_ids(batch, tokenizer) -> list[int]:
    """The record number of every segment in the batch (read back from its supervised caption)."""
    ids = []
    for b in range(batch["input_ids"].shape[0]):
        for seg in np.unique(batch["segment_ids"][b][batch["segment_ids"][b] > 0]):
            answer = batch["input_ids"][b][(batch["segment_ids"][b] == seg) & (batch["loss_mask"][b] > 0)]
            ids.append(int(tokenizer.decode(answer[:-1])))  # drop <|eot|>
    return ids


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_batch_contract_and_packing(tokenizer):
    cfg = counting_config()
    it = build_pipeline(cfg, tokenizer, SPEC)
    batch = next(it)
    b_, s_, n_, t_ = 3, 64, 4, 4
    expected = {"input_ids": ((b_, s_), np.int32), "pixel_values": ((b_, n_, t_, 3, 28, 28), np.float32),
                "aspect_ratio_ids": ((b_, n_), np.int32), "aspect_ratio_mask": ((b_, n_, t_), np.int32),
                "cross_attention_mask": ((b_, s_, n_, t_), np.int32), "loss_mask": ((b_, s_), np.float32),
                "segment_ids": ((b_, s_), np.int32), "positions": ((b_, s_), np.int32),
                "image_segment_ids": ((b_, n_), np.int32)}
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == expected
    image_id, bos = tokenizer.image_id, tokenizer.bos_id
    assert (batch["segment_ids"].max(1) >= 2).any()  # something really was packed
    for b in range(b_):
        seg, pos, ids = batch["segment_ids"][b], batch["positions"][b], batch["input_ids"][b]
        valid = seg > 0
        assert (np.diff(seg[valid]) >= 0).all() and not valid[np.argmin(valid):].any()  # contiguous, then pad
        assert (ids[~valid] == tokenizer.pad_id).all() and not batch["loss_mask"][b][~valid].any()
        slot = 0
        for s in np.unique(seg[valid]):
            where = np.flatnonzero(seg == s)
            np.testing.assert_array_equal(pos[where], np.arange(len(where)))  # positions restart per segment
            assert ids[where[0]] == bos
            for start in where[ids[where] == image_id]:
                attends = np.flatnonzero(batch["cross_attention_mask"][b, :, slot].any(-1))
                # The image is seen from its own token to the end of ITS segment, never by another segment.
                assert attends[0] == start and set(seg[attends]) == {s}
                assert batch["image_segment_ids"][b, slot] == s  # the slot's owner, for the model's fallback
                n_tiles = batch["aspect_ratio_mask"][b, slot].sum()
                assert batch["aspect_ratio_ids"][b, slot] > 0
                assert (batch["cross_attention_mask"][b, attends, slot, :n_tiles] == 1).all()
                assert not batch["cross_attention_mask"][b, :, slot, n_tiles:].any()
                slot += 1
        assert not batch["aspect_ratio_ids"][b, slot:].any()  # padded slots
        assert not batch["image_segment_ids"][b, slot:].any()
        assert not batch["pixel_values"][b, slot:].any()
    it.close()


def test_same_seed_same_batches_and_different_seed_differs(tokenizer):
    run = lambda seed: take(build_pipeline(counting_config(seed=seed), tokenizer, SPEC), 3)
    first = run(3)
    assert_same(first, run(3))
    assert not np.array_equal(first[0]["input_ids"], run(4)[0]["input_ids"])


@pytest.mark.parametrize("prefetch", [0, 2])
def test_restore_continues_exactly(tokenizer, prefetch):
    cfg = counting_config(workers=WorkerConfig(prefetch_batches=prefetch))
    it = build_pipeline(cfg, tokenizer, SPEC)
    take(it, 3)
    state = json.loads(json.dumps(it.get_state()))  # the state is plain JSON
    expected = take(it, 3)
    it.close()
    resumed = build_pipeline(cfg, tokenizer, SPEC, state=state)
    assert_same(expected, take(resumed, 3))
    resumed.set_state(state)  # rewinding an open iterator works too
    assert_same(expected[:1], take(resumed, 1))
    resumed.close()


def test_reshard_4_to_2_loses_and_repeats_nothing(tokenizer):
    cfg = counting_config()
    seen = []
    old = [build_pipeline(cfg, tokenizer, SPEC, p, 4) for p in range(4)]
    for p, it in enumerate(old):
        for batch in take(it, 2 + p):  # processes at different points mid-epoch
            seen += sample_ids(batch, tokenizer)
    states = [json.loads(json.dumps(it.get_state())) for it in old]
    new_states = reshard_states(states, 2)
    new = [build_pipeline(cfg, tokenizer, SPEC, p, 2, state=new_states[p]) for p in range(2)]
    for it in new:
        for batch in take(it, 4):
            seen += sample_ids(batch, tokenizer)
    assert len(seen) == len(set(seen)), "a sample was repeated"
    # Map record numbers back to global stream positions (a fresh single-process pass reads them in order).
    order = []
    ref = build_pipeline(counting_config(packing=PackingConfig(False)), tokenizer, SPEC)
    while len(order) < len(seen) + 60:
        order += sample_ids(next(ref), tokenizer)
    positions = sorted(order.index(i) for i in seen)
    frontier = min(_first_unread(s) for s in (it.get_state() for it in new))
    assert positions[:frontier] == list(range(frontier)), "a sample before the frontier was lost"
    assert frontier > 20
    total_good = sum(s["records"]["good"] for s in (it.get_state() for it in new))
    assert total_good == len(seen)  # record counts carried over into the new process 0


def _first_unread(state):
    i = state["next"]
    pos = lambda k: state["base"] + state["process_index"] + k * state["process_count"]
    while pos(i) in set(state["skip"]):
        i += 1
    return pos(i)


def test_worker_processes_give_the_same_batches(tokenizer):
    threads = take(build_pipeline(counting_config(), tokenizer, SPEC), 3)
    it = build_pipeline(counting_config(workers=WorkerConfig(num_workers=2, prefetch_batches=2)), tokenizer, SPEC)
    try:
        assert_same(threads, take(it, 3))
    finally:
        it.close()


def test_embedded_mixture_and_eval_split(tokenizer):
    cfg = DataConfig(sources=(SourceConfig("embedded", "digits_qa", weight=3), SourceConfig("embedded", "ocr_word")),
                     eval_sources=(SourceConfig("embedded", "digits_qa", split="test"),),
                     shapes=ShapeConfig(batch_size=8, seq_len=24), workers=WorkerConfig(prefetch_batches=0))
    batch = next(build_pipeline(cfg, tokenizer, SPEC))
    questions = [tokenizer.decode(row[:12]) for row in batch["input_ids"]]
    assert any("digit" in q for q in questions)
    evaluation = list(build_pipeline(cfg, tokenizer, SPEC, train=False))
    assert len(evaluation) == 45  # 360 held-out digits / 8, once, in order
    rows = np.concatenate([b["segment_ids"].max(1) for b in evaluation])
    assert (rows == 1).all()
    assert tokenizer.special_id(tok.USER) in evaluation[0]["input_ids"][0]


def test_unified_family_batch_with_catty_tiles(tokenizer):
    spec = InputSpec("unified", image_size=28, tokens_per_image=3)
    cfg = counting_config(image=ImageConfig(op="catty_tile", max_tiles=2),
                          shapes=ShapeConfig(batch_size=3, seq_len=96, max_images=6))
    batch = next(build_pipeline(cfg, tokenizer, spec))
    assert batch["pixel_values"].shape == (3, 6, 3, 28, 28) and batch["image_mask"].shape == (3, 6)
    assert "cross_attention_mask" not in batch and "aspect_ratio_ids" not in batch
    slots = batch["image_mask"].sum(1)
    assert (slots > 1).any() and set(np.unique(slots)) - {0} <= set(range(1, 7))
    for b in range(3):
        image_tokens = int((batch["input_ids"][b] == tokenizer.image_id).sum())
        assert image_tokens == 3 * slots[b]  # every slot (tile or thumbnail) expanded to tokens_per_image
        assert batch["image_mask"][b, :slots[b]].all() and not batch["pixel_values"][b, slots[b]:].any()
        assert not batch["loss_mask"][b][batch["input_ids"][b] == tokenizer.image_id].any()


@pytest.mark.parametrize("family,tokens_per_image", [("cross_attention", 1), ("unified", 4)])
def test_truncation_never_splits_an_image_and_drops_cut_images(tokenizer, family, tokens_per_image):
    spec = SPEC if family == "cross_attention" else InputSpec("unified", image_size=28, tokens_per_image=4)
    image_cfg = ImageConfig(op="mllama_tile" if family == "cross_attention" else "resize")
    image = np.zeros((28, 28, 3), np.uint8)
    record = {"images": [image, image],
              "turns": [("user", "<image>How many?"), ("assistant", "7"), ("user", "<image>How many?"),
                        ("assistant", "8")]}
    prepare = lambda seq_len: ExamplePreparer(spec, get_template("simple", tokenizer), image_cfg,
                                              ShapeConfig(seq_len=seq_len, max_images=2))(record)
    full = prepare(512)
    second_image = int(np.flatnonzero(full["tokens"] == tokenizer.image_id)[tokens_per_image])
    # Cut one token into the second image's block (for Mllama the block is one token: cut just before it).
    cut = prepare(second_image + (tokens_per_image > 1))
    assert cut["truncated"] and len(cut["images"]) == 1 and cut["num_slots"] == 1
    assert len(cut["tokens"]) == second_image  # back to the block start: no partial image
    assert (cut["tokens"] == tokenizer.image_id).sum() == tokens_per_image
    assert cut["loss_mask"].any() and not full["truncated"]
    if family == "cross_attention":
        assert cut["spans"].tolist() == [[int(np.flatnonzero(cut["tokens"] == tokenizer.image_id)[0]), second_image]]
