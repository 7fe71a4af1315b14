"""The one data protocol the trainer reads, whatever produces the batches (`TrainData`).

An implementation is registered by kind (`@TRAIN_DATA.register("pipeline")`) and built as
`cls(cfg, stages, family, echo, hosts)`: the family's `train_data` kind, or "synthetic" when train.synthetic.enabled.
`hosts=None` is a run (this job's processes, reading the data); `hosts=N` is a plan for N hosts, which needs only
the batch shapes, so the data need not exist on the planning machine. Batches are
host-local numpy dicts: the model's inputs plus what the objective reads (`loss_mask`, ...). The trainer
saves `state(iterator)` as the `data_iter` checkpoint item {"stage", "iter"} and hands it back to `iterator`.
"""
from __future__ import annotations

from typing import Iterator

import jax
import numpy as np

from vlm_jax import sharding
from vlm_jax.config import stage_data_config
from vlm_jax.data.sources import check_present
from vlm_jax.errors import ConfigError


class TrainData:
    reads_pairs = False  # serves objectives that read preference pairs (vlm_jax/objectives/base.py)

    def example_batch(self, stage: int) -> dict[str, np.ndarray]:
        """A host batch of the stage's shapes (what the step is compiled for), read from no source."""
        raise NotImplementedError

    def global_batch(self, stage: int) -> int:
        """Rows per step over all processes."""
        raise NotImplementedError

    def sample_shape(self, stage: int) -> tuple[int, int]:
        """(tokens, image slots) of one row, for the FLOPs model."""
        raise NotImplementedError

    def iterator(self, stage: int, saved: dict) -> Iterator[dict[str, np.ndarray]]:
        """The stage's training batches, continuing `saved` (the checkpoint's data_iter item) where it applies.
        The iterator has get_state() and close()."""
        raise NotImplementedError

    def state(self, iterator) -> dict:
        """The `iter` part of the data_iter item (JSON); a collective when there are several processes."""
        return iterator.get_state()

    def eval_batches(self, stage: int, limit: int) -> Iterator[dict[str, np.ndarray]]:
        """Held-out host batches, in order, at most `limit` (0 = all); the same count on every process."""
        raise NotImplementedError

    def eval_metrics(self, model, params, stage: int, mesh, rules) -> dict[str, float]:
        """Task metrics of the data's own (e.g. retrieval recall), logged beside eval_loss."""
        return {}

    def place(self, batch: dict, mesh, rules) -> dict:
        """Host batch -> global arrays: each process holds its own rows of the global batch."""
        if jax.process_count() == 1:
            return sharding.shard_batch(batch, mesh, rules)
        return {k: jax.make_array_from_process_local_data(sharding.data_sharding(mesh, rules, v.ndim), v)
                for k, v in batch.items()}


class StagedSourcesData(TrainData):
    """Data read from `data.sources`, with each stage's overrides merged in; one global batch is
    data.shapes.batch_size rows from each process."""

    def __init__(self, cfg, stages, family, echo=print, hosts: int | None = None):
        self.cfg, self.family, self.echo = cfg, family, echo
        self.reads = hosts is None
        self.process_index, self.process_count = (jax.process_index(), jax.process_count()) if self.reads else (0, hosts)
        if not cfg.data.sources:
            raise ConfigError(f"data.sources is empty; list the training sources (e.g. data.sources='[{{kind: "
                              "embedded, name: digits_qa}]') or set train.synthetic.enabled=true for generated batches")
        self.configs = {s.index: stage_data_config(cfg.data, s.data, f"train.stages[{s.index}].data") for s in stages}
        for stage in stages:
            data, index = self.configs[stage.index], stage.index
            if stage.eval_every and not data.eval_sources:
                where = "data" if index == 0 else f"train.stages[{index}].data"
                raise ConfigError(f"train.eval_every is set but {where}.eval_sources is empty; list held-out "
                                  "sources (e.g. the embedded task's split: test) or set train.eval_every=0")
            if self.reads:  # a missing data mix stops here, before the model is built, not steps later
                for kind, sources in (("sources", data.sources), ("eval_sources", data.eval_sources)):
                    for i, source in enumerate(sources):
                        check_present(source, f"{'data' if index == 0 else f'train.stages[{index}].data'}.{kind}[{i}]")

    def data(self, stage: int):
        return self.configs[stage]

    def global_batch(self, stage: int) -> int:
        return self.configs[stage].shapes.batch_size * self.process_count

    def sample_shape(self, stage: int) -> tuple[int, int]:
        shapes = self.configs[stage].shapes
        return shapes.seq_len, shapes.max_images

    def continued_state(self, stage: int, saved: dict) -> dict | None:
        """The saved iterator state when it belongs to `stage`, or to an earlier stage reading the same
        sources (the stream goes on); None = start the stage's stream afresh."""
        owner = saved.get("stage")
        if owner is None or "iter" not in saved or owner not in self.configs:
            return None
        previous, data = self.configs[owner], self.configs[stage]
        if owner == stage or (previous.sources, previous.seed) == (data.sources, data.seed):
            return saved["iter"]
        return None


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

    def close(self):
        pass
