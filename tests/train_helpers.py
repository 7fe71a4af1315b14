"""Shared pieces of the training tests: the tiny config with small batches, reading back params and data-iterator
state, and a trainer that records what it read."""
import hashlib
import json
import math
import os
import re

import jax
import numpy as np

from vlm_jax.config import load_config
from vlm_jax.train import checkpoint
from vlm_jax.train.loop import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "models", "tiny_mllama.yaml")
SMALL_RUN = ["train.batch_size=8", "train.synthetic.seq_len=16", "train.schedule.learning_rate=1e-3",
             "train.schedule.warmup_steps=2", "train.log.tensorboard=false"]


def xla_flags(devices: int) -> str:
    """This session's XLA_FLAGS (conftest's cheap codegen included) for a subprocess with `devices` CPU devices."""
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", os.environ.get("XLA_FLAGS", ""))
    return f"{flags} --xla_force_host_platform_device_count={devices}".strip()


def tiny_config(workdir, *overrides):
    """The tiny Mllama on generated batches, or on the data that `overrides` configure."""
    data = [] if any(o.startswith("data.") for o in overrides) else ["train.synthetic.enabled=true"]
    return load_config(TINY, [f"workdir={workdir}", *SMALL_RUN, *data, *overrides])


def final_params(workdir, step=None) -> dict:
    """Host copies of a run's params, keyed by path."""
    path = os.path.join(workdir, "checkpoints")
    if step is not None:
        path = os.path.join(path, str(step))
    params = checkpoint.restore_params(path)
    return {"/".join(str(k.key) for k in p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}


def data_iter(workdir, step) -> dict:
    """The data_iter checkpoint item a run saved at `step`."""
    with checkpoint.train_manager(os.path.join(workdir, "checkpoints"), max_to_keep=3, keep_every=0,
                                  async_save=False) as mgr:
        return checkpoint.restore_item(mgr, step, checkpoint.DATA_ITER)


class Recorder:
    """Wraps a training iterator: notes a hash of every row's images."""

    def __init__(self, iterator, log: list):
        self.iterator, self.log = iterator, log

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.iterator)
        self.log.append([hashlib.sha1(row.tobytes()).hexdigest() for row in batch["pixel_values"]])
        return batch

    def get_state(self):
        return self.iterator.get_state()

    def close(self):
        self.iterator.close()


class RecordingTrainer(Trainer):
    """A Trainer whose `batches` lists, per training batch read, the hashes of its rows' images."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.batches = []

    def open_source(self, stage, data_iter):
        return Recorder(super().open_source(stage, data_iter), self.batches)


def check_learning_run(result, workdir: str, steps: int, eval_steps: list[int]) -> list[dict]:
    """A short run's losses are finite and fall, metrics.jsonl logged every step, and the held-out loss at
    `eval_steps` falls too; returns the metrics records."""
    losses = [result.losses[s] for s in range(1, steps + 1)]
    assert all(math.isfinite(x) for x in losses)
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.3, losses
    assert losses[-1] < losses[0] - 0.3, losses
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    evals = {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}
    assert sorted(evals) == eval_steps and all(math.isfinite(v) for v in evals.values())
    assert evals[eval_steps[-1]] < evals[eval_steps[0]]
    return records


def reference_run(tmp_path_factory, make_config, overrides) -> tuple[str, RecordingTrainer, object]:
    """(workdir, trainer, result) of an uninterrupted recorded run, for a module-scoped fixture."""
    workdir = str(tmp_path_factory.mktemp("reference"))
    trainer = RecordingTrainer(make_config(workdir, *overrides), echo=lambda _: None)
    return workdir, trainer, trainer.run()


def check_resume_matches_reference(reference, make_config, workdir: str, cut, steps: int) -> list[str]:
    """Runs the single-stage `cut` overrides to steps // 2, then again to `steps` in the same workdir. The
    second run resumes; together they read exactly the reference run's batches (nothing repeated or skipped)
    and end with its data-iterator state and bitwise its params. Returns the second run's messages."""
    ref_dir, ref_trainer, _ = reference
    first = RecordingTrainer(make_config(workdir, *cut, f"train.steps={steps // 2}"), echo=lambda _: None)
    first.run()
    messages = []
    second = RecordingTrainer(make_config(workdir, *cut, f"train.steps={steps}"), echo=messages.append)
    assert int(second.run().state.step) == steps
    assert any(f"step {steps // 2}" in m and "resumed" in m for m in messages)
    assert first.batches + second.batches == ref_trainer.batches
    assert data_iter(workdir, steps)["iter"] == data_iter(ref_dir, steps)["iter"]
    want, got = final_params(ref_dir), final_params(workdir)
    assert want.keys() == got.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    return messages
