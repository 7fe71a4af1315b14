"""Shared pieces of the training tests: the tiny config with small batches, and reading back params."""
import os

import jax
import numpy as np

from vlm_jax.config import load_config
from vlm_jax.train import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "models", "tiny_mllama.yaml")
SMALL_RUN = ["train.batch_size=8", "train.synthetic.seq_len=16", "train.schedule.learning_rate=1e-3",
             "train.schedule.warmup_steps=2", "train.log.tensorboard=false"]


def tiny_config(workdir, *overrides):
    return load_config(TINY, [f"workdir={workdir}", *SMALL_RUN, *overrides])


def final_params(workdir, step=None) -> dict:
    """Host copies of a run's params, keyed by path."""
    path = os.path.join(workdir, "checkpoints")
    if step is not None:
        path = os.path.join(path, str(step))
    params = checkpoint.restore_params(path)
    return {"/".join(str(k.key) for k in p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
