"""The batch-source interface the trainer consumes, and an in-memory synthetic source implementing it.

A source is an iterator of host-local numpy batch dicts (the model's inputs plus `loss_mask`, optionally
`segment_ids`/`positions`) with get_state()/set_state() over JSON-able state; the trainer saves that state as
the `data_iter` checkpoint item. The Grain iterator satisfies the same protocol.
"""
from __future__ import annotations

import json
import os
import time
from typing import Protocol

import numpy as np

from vlm_jax.config import UNIFIED_FAMILIES, ModelConfig, SyntheticDataConfig
from vlm_jax.errors import ConfigError

# Batch keys the model takes, per family (the rest, e.g. loss_mask, only feed the loss).
MODEL_INPUTS = ("input_ids", "pixel_values", "aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask",
                "segment_ids", "positions", "image_segment_ids")  # cross-attention (Mllama)
UNIFIED_INPUTS = ("input_ids", "pixel_values", "image_mask", "segment_ids", "positions")  # LLaVA, Idefics3


def model_inputs(batch: dict, model: ModelConfig) -> dict:
    """The entries of `batch` that `model`'s family takes as keyword arguments."""
    keys = UNIFIED_INPUTS if model.family in UNIFIED_FAMILIES else MODEL_INPUTS
    return {k: batch[k] for k in keys if k in batch}


class BatchSource(Protocol):
    def __iter__(self) -> "BatchSource": ...
    def __next__(self) -> dict[str, np.ndarray]: ...
    def get_state(self) -> dict: ...
    def set_state(self, state: dict) -> None: ...


class SeededStream:
    """A batch stream that is a pure function of (seed, position): its JSON state is just those two, so a
    restored run continues with exactly the batches an uninterrupted one would have read."""
    kind = ""  # names the stream in its state, so a checkpoint of another kind is refused
    seed: int
    position: int = 0

    def __iter__(self):
        return self

    def get_state(self) -> dict:
        return {"kind": self.kind, "seed": self.seed, "position": self.position}

    def set_state(self, state: dict) -> None:
        if state.get("kind") != self.kind or state.get("seed") != self.seed:
            raise ConfigError(f"data iterator state {state} does not belong to this {self.kind} source "
                              f"(seed {self.seed}); start a new workdir")
        self.position = int(state["position"])


class SyntheticSource(SeededStream):
    """Batch i is a pure function of (seed, i): each row is an arithmetic progression of tokens (learnable)
    after BOS and one image token; the second half of the row is supervised; the image is random tiles."""
    kind = "synthetic"

    def __init__(self, model: ModelConfig, data: SyntheticDataConfig, batch_size: int, seed: int):
        if model.family != "mllama":
            raise ConfigError(f"model.family '{model.family}': synthetic batches (data.sources empty) are Mllama-"
                              "shaped; set data.sources, e.g. [{kind: embedded, name: digits_qa}]")
        v = model.vision
        ratio = (1, data.num_tiles)
        if ratio not in v.supported_aspect_ratios:
            raise ConfigError(f"train.synthetic.num_tiles={data.num_tiles}: aspect ratio {ratio} is not in "
                              f"model.vision.supported_aspect_ratios")
        self.model, self.data, self.batch_size, self.seed = model, data, batch_size, seed
        self.aspect_ratio_id = v.supported_aspect_ratios.index(ratio) + 1
        self.position = 0

    def __next__(self) -> dict[str, np.ndarray]:
        if self.data.delay_s:
            time.sleep(self.data.delay_s)
        batch = self.batch(self.position)
        self.position += 1
        return batch

    def batch(self, index: int) -> dict[str, np.ndarray]:
        v, t = self.model.vision, self.model.text
        b, s, n, tiles = self.batch_size, self.data.seq_len, self.data.num_images, self.data.num_tiles
        rng = np.random.default_rng([self.seed, index])
        first_word = 3  # ids below are reserved (pad/bos/eos in the tiny vocab)
        span = t.vocab_size - first_word
        start = rng.integers(0, span, size=(b, 1))
        stride = rng.integers(1, 4, size=(b, 1))
        ids = first_word + (start + stride * np.arange(s)) % span
        ids[:, 0] = t.bos_token_id
        image_slot = min(1, s - 1)
        ids[:, image_slot] = self.model.image_token_index
        loss_mask = np.zeros((b, s), np.float32)
        loss_mask[:, s // 2:] = 1.0
        pixels = np.zeros((b, n, v.max_num_tiles, v.num_channels, v.image_size, v.image_size), np.float32)
        pixels[:, :, :tiles] = rng.standard_normal(pixels[:, :, :tiles].shape, dtype=np.float32)
        tile_mask = np.zeros((b, n, v.max_num_tiles), np.int32)
        tile_mask[:, :, :tiles] = 1
        cross = np.zeros((b, s, n, v.max_num_tiles), np.int32)
        cross[:, image_slot:, :, :tiles] = 1
        return dict(input_ids=ids.astype(np.int32), pixel_values=pixels,
                    aspect_ratio_ids=np.full((b, n), self.aspect_ratio_id, np.int32),
                    aspect_ratio_mask=tile_mask, cross_attention_mask=cross, loss_mask=loss_mask)


# ---------------------------------------------------------------------------------- Grain pipeline

TOKENIZER_FILE = "tokenizer.model"


class PipelineData:
    """Everything the trainer needs to read `cfg.data` through the Grain pipeline: the tokenizer, each stage's
    data config (stage overrides merged), iterators, the example batch the step compiles for, and the
    `data_iter` checkpoint item. One global batch = data.shapes.batch_size rows from each of the processes.

    The saved item is {"kind": "grain", "process_states": [state of process 0, 1, ...]} (gathered from all
    processes at each save), so a checkpoint resumes on any process count: the same count picks its own state,
    another count re-shards all of them with `reshard_states` (deterministic: every process computes the same).
    """

    def __init__(self, cfg, stages, echo=print):
        from vlm_jax.config import stage_data_config
        from vlm_jax.data import input_spec_from_model
        import jax

        self.cfg, self.echo = cfg, echo
        self.process_index, self.process_count = jax.process_index(), jax.process_count()
        self.configs = {s.index: stage_data_config(cfg.data, s.data, f"train.stages[{s.index}].data") for s in stages}
        try:
            self.spec = input_spec_from_model(cfg.model)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.tokenizer, where = self._tokenizer()
        model = cfg.model
        if self.tokenizer.image_id != model.image_token_index:
            raise ConfigError(f"model.image_token_index ({model.image_token_index}) must equal the <|image|> id "
                              f"({self.tokenizer.image_id}) of the tokenizer {where}; set "
                              f"model.image_token_index={self.tokenizer.image_id}")
        if self.tokenizer.vocab_size > model.text.vocab_size:
            raise ConfigError(f"the tokenizer {where} has {self.tokenizer.vocab_size} tokens, more than "
                              f"model.text.vocab_size ({model.text.vocab_size}); use a smaller tokenizer or model")
        micro = cfg.train.microbatches
        for index, data in self.configs.items():
            rows = self.global_batch(index)
            if rows % micro:
                raise ConfigError(f"train.microbatches ({micro}) must divide the global batch {rows} "
                                  f"(data.shapes.batch_size {data.shapes.batch_size} x {self.process_count} processes)")
            if cfg.train.eval_examples and self.spec.family != "cross_attention":
                raise ConfigError("train.eval_examples (greedy-answer accuracy) needs a cross-attention (mllama) "
                                  f"model; set train.eval_examples=0 for '{cfg.model.family}'")
            if cfg.train.eval_every and not data.eval_sources:
                raise ConfigError("train.eval_every is set but data.eval_sources is empty; list held-out sources "
                                  "(e.g. the embedded task's split: test) or set train.eval_every=0")

    def _tokenizer(self):
        from vlm_jax.data import load_tokenizer, task_texts, train_sentencepiece

        if self.cfg.data.tokenizer:
            try:
                return load_tokenizer(self.cfg.data.tokenizer), f"data.tokenizer={self.cfg.data.tokenizer}"
            except ValueError as e:
                raise ConfigError(f"data.tokenizer: {e}") from None
        kinds = {s.kind for d in self.configs.values() for s in d.sources + d.eval_sources}
        if kinds != {"embedded"}:
            raise ConfigError("data.tokenizer is empty; set it to a sentencepiece .model or an HF tokenizer.json "
                              "(one is trained automatically only when every source is an embedded task)")
        path = os.path.join(os.path.abspath(self.cfg.workdir), TOKENIZER_FILE)
        if os.path.isfile(path):
            return load_tokenizer(path), path
        # Deterministic (one training thread), so every process trains the same one; process 0 keeps it.
        tokenizer = train_sentencepiece(task_texts(), vocab_size=self.cfg.model.text.vocab_size)
        if self.process_index == 0:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tokenizer.save(path + ".tmp")
            os.replace(path + ".tmp", path)
            self.echo(f"trained a {tokenizer.vocab_size}-token sentencepiece tokenizer on the embedded tasks: {path}")
        return tokenizer, path

    def data(self, stage_index: int):
        return self.configs[stage_index]

    def global_batch(self, stage_index: int) -> int:
        return self.configs[stage_index].shapes.batch_size * self.process_count

    def example(self, stage_index: int) -> dict[str, np.ndarray]:
        """An all-padding host batch of the stage's shapes (what the step is compiled for), read from no source."""
        from vlm_jax.data import collate
        shapes = self.configs[stage_index].shapes
        return collate([[] for _ in range(shapes.batch_size)], self.spec, shapes, self.tokenizer.pad_id)

    def open(self, stage_index: int, saved: dict):
        """The stage's training iterator, continuing `saved` ({"stage", "iter"} of the checkpoint) when it
        belongs to this stage, or to an earlier stage reading the same sources (the stream goes on)."""
        from vlm_jax.data import build_pipeline
        data, state = self.configs[stage_index], None
        owner = saved.get("stage")
        if owner is not None and "iter" in saved and owner in self.configs:
            previous = self.configs[owner]
            if owner == stage_index or (previous.sources, previous.seed) == (data.sources, data.seed):
                state = self.own_state(saved["iter"])
        return build_pipeline(data, self.tokenizer, self.spec, self.process_index, self.process_count,
                              train=True, state=state)

    def own_state(self, saved: dict) -> dict:
        from vlm_jax.data import reshard_states
        if saved.get("kind") != "grain":
            raise ConfigError(f"the checkpoint's data iterator is '{saved.get('kind')}', not the Grain pipeline "
                              "(data.sources changed since it was written); use a new workdir")
        states = saved["process_states"]
        if len(states) == self.process_count and all(s["process_count"] == self.process_count for s in states):
            return states[self.process_index]
        self.echo(f"re-sharding the data iterator from {len(states)} to {self.process_count} processes")
        return reshard_states(states, self.process_count)[self.process_index]

    def state(self, iterator) -> dict:
        """The `iter` part of the data_iter item: every process's iterator state (a collective when P > 1)."""
        own = iterator.get_state()
        if self.process_count == 1:
            return {"kind": "grain", "process_states": [own]}
        from jax.experimental import multihost_utils
        raw = np.frombuffer(json.dumps(own).encode(), np.uint8)
        sizes = np.asarray(multihost_utils.process_allgather(np.array([raw.size], np.int32))).reshape(-1)
        padded = np.zeros(int(sizes.max()), np.uint8)
        padded[:raw.size] = raw
        gathered = np.asarray(multihost_utils.process_allgather(padded)).reshape(self.process_count, -1)
        return {"kind": "grain", "process_states": [json.loads(bytes(gathered[p, :sizes[p]]).decode())
                                                    for p in range(self.process_count)]}

    def eval_batches(self, stage_index: int, limit: int):
        """Host batches of the held-out sources, in order, at most `limit` (0 = all); same count on every process."""
        from vlm_jax.data import build_pipeline
        iterator = build_pipeline(self.configs[stage_index], self.tokenizer, self.spec, self.process_index,
                                  self.process_count, train=False)
        try:
            for i, batch in enumerate(iterator):
                if limit and i >= limit:
                    break
                yield batch
        finally:
            iterator.close()
