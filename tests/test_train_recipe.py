"""The tiny three-stage recipe: frozen params stay bitwise unchanged and hold no optimizer state; a stage
with reset_optimizer starts a fresh one; every stage ends in a checkpoint."""
import os

import jax
import numpy as np

from vlm_jax.config import load_config
from vlm_jax.train import optimizer as opt
from vlm_jax.train.loop import Trainer
from vlm_jax.train.state import StagePlan
from train_helpers import ROOT, final_params

RECIPE = os.path.join(ROOT, "configs", "recipes", "tiny_llama3v_synthetic.yaml")


def test_tiny_recipe_freezes_resets_and_checkpoints(tmp_path):
    cfg = load_config(RECIPE, [f"workdir={tmp_path}", "train.log.tensorboard=false",
                               "train.checkpoint.async_save=false", "train.checkpoint.max_to_keep=10"])
    messages = []
    trainer = Trainer(cfg, echo=messages.append)
    initial = {k: np.asarray(v) for k, v in opt.flatten(trainer.fresh_state().params).items()}
    result = trainer.run()

    assert sorted(result.losses) == list(range(1, 15))
    assert {4, 6, 8, 10, 12, 14} == {int(d) for d in os.listdir(tmp_path / "checkpoints")}
    assert any("stage 'anneal' (step 6): fresh optimizer state" in m for m in messages)
    # Quiet by default: one line per stage (no per-parameter table), and each stage's compile announced and timed.
    assert sum(m.startswith("stage '") and "trainable" in m for m in messages) == 3
    assert not any(m.startswith("parameter ") for m in messages)
    assert sum(m.startswith("compiling the train step of stage") for m in messages) == 3
    assert sum(m.startswith("compiled and ran the first step in") for m in messages) == 3
    again = []
    Trainer(cfg, echo=again.append).run()
    assert any("nothing to train: the run is at step 14 and the config ends at step 14" in m for m in again)
    assert np.all(np.isfinite(list(result.losses.values())))

    pretrain = trainer.plan(trainer.stages[0])
    after_pretrain = final_params(str(tmp_path), step=6)
    frozen = [p for p in initial if p not in pretrain.trainable]
    assert any(p.startswith("text/decoder/layer_0/") for p in frozen) and "text/lm_head/kernel" in frozen
    for p in frozen:
        np.testing.assert_array_equal(after_pretrain[p], initial[p], err_msg=p)
    assert all(not np.array_equal(after_pretrain[p], initial[p]) for p in pretrain.trainable if "gate" not in p)

    # No optimizer state for frozen leaves: compare with the same stage training everything.
    everything = StagePlan(cfg, trainer.stages[2], trainer.abstract_boxed, trainer.mesh, trainer.rules)
    partial_state = pretrain.abstract_opt_state(trainer.abstract_params)
    full_state = everything.abstract_opt_state(trainer.abstract_params)
    n_trainable, n_all = len(pretrain.trainable), len(everything.trainable)
    assert len(jax.tree.leaves(partial_state)) - len(jax.tree.leaves(full_state)) == 2 * (n_trainable - n_all)
    saved = opt.tree_bytes(full_state) - opt.tree_bytes(partial_state)
    frozen_bytes = sum(initial[p].nbytes for p in frozen)
    assert saved == 2 * frozen_bytes  # Adam's two moments of every frozen parameter
    print(f"optimizer state: {opt.tree_bytes(partial_state):,} bytes with the LLM frozen vs "
          f"{opt.tree_bytes(full_state):,} training everything ({saved:,} bytes saved)")
