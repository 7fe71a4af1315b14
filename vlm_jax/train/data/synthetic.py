"""train.synthetic.enabled: generated batches of the family's input structure (`Family.synthetic_batch`), each a
pure function of (seed, position). For benchmarks, plans, and recipes whose data mixes do not exist yet."""
from __future__ import annotations

import time

import numpy as np

from vlm_jax import sharding
from vlm_jax.errors import ConfigError
from vlm_jax.registry import TRAIN_DATA
from vlm_jax.train.data.base import SeededStream, TrainData


class SyntheticSource(SeededStream):
    """Batch i of a stage: `family.synthetic_batch` with the generator seeded by (seed, i)."""
    kind = "synthetic"

    def __init__(self, family, model, data, batch_size: int, seed: int):
        self.family, self.model, self.data, self.batch_size, self.seed = family, model, data, batch_size, seed
        self.position = 0

    def __next__(self) -> dict[str, np.ndarray]:
        if self.data.delay_s:
            time.sleep(self.data.delay_s)
        batch = self.batch(self.position)
        self.position += 1
        return batch

    def batch(self, index: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, index])
        return self.family.synthetic_batch(self.model, self.data, self.batch_size, rng)


@TRAIN_DATA.register("synthetic")
class SyntheticData(TrainData):
    """train.batch_size rows of each stage's train.synthetic shapes; every process generates the whole global
    batch (the same one) and keeps its devices' rows."""

    def __init__(self, cfg, stages, family, echo=print, hosts: int | None = None):  # a global batch on any hosts
        self.cfg, self.family = cfg, family
        self.stages = {s.index: s for s in stages}
        if cfg.train.batch_size % cfg.train.microbatches:  # the pipeline checks its own (data.shapes) batch
            raise ConfigError(f"train.microbatches ({cfg.train.microbatches}) must divide train.batch_size "
                              f"({cfg.train.batch_size})")
        for stage in stages:  # the family's own checks (e.g. tile counts) fail here, before anything is built
            self.example_batch(stage.index)

    def source(self, stage: int, seed_offset: int = 0, rows: int = 0) -> SyntheticSource:
        return SyntheticSource(self.family, self.cfg.model, self.stages[stage].synthetic,
                               rows or self.cfg.train.batch_size, self.cfg.seed + 1000 * stage + seed_offset)

    def example_batch(self, stage: int) -> dict[str, np.ndarray]:
        """One generated row repeated as a read-only view: a pod-sized batch costs one row of memory."""
        row = self.source(stage, rows=1).batch(0)
        return {k: np.broadcast_to(v, (self.cfg.train.batch_size, *v.shape[1:])) for k, v in row.items()}

    def global_batch(self, stage: int) -> int:
        return self.cfg.train.batch_size

    def sample_shape(self, stage: int) -> tuple[int, int]:
        synthetic = self.stages[stage].synthetic
        return synthetic.seq_len, synthetic.num_images

    def iterator(self, stage: int, saved: dict) -> SyntheticSource:
        source = self.source(stage)
        if saved.get("stage") == stage:
            source.set_state(saved["iter"])
        return source

    def eval_batches(self, stage: int, limit: int):
        """`limit` batches of a second stream (seed + 1) of the stage."""
        source = self.source(stage, seed_offset=1)
        for _ in range(limit):
            yield next(source)

    def place(self, batch: dict, mesh, rules) -> dict:
        return sharding.shard_batch(batch, mesh, rules)
