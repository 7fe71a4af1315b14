"""NaN/Inf guard: a non-finite step applies no update and is counted; K in a row stop the run with one line."""
import json

import numpy as np
import pytest

from vlm_jax.train.loop import NonFiniteError, Trainer
from train_helpers import tiny_config


class PoisonedTrainer(Trainer):
    """Batches with these indices carry NaN pixels, so loss and gradients are NaN."""
    poisoned: frozenset = frozenset()

    def open_source(self, stage, data_iter):
        src = super().open_source(stage, data_iter)
        clean = src.batch

        def batch(index):
            b = clean(index)
            if index in self.poisoned:
                b["pixel_values"][:] = np.nan
            return b
        src.batch = batch
        return src


def _run(tmp_path, poisoned, *overrides):
    trainer = PoisonedTrainer(tiny_config(tmp_path, "train.steps=6", "train.checkpoint.every_steps=100",
                                          "train.checkpoint.async_save=false", *overrides), echo=lambda m: None)
    trainer.poisoned = frozenset(poisoned)
    return trainer, trainer.run


def test_nonfinite_steps_are_skipped_and_counted(tmp_path):
    _, run = _run(tmp_path / "clean", ())
    clean = run()
    _, run = _run(tmp_path / "poisoned", {2, 3}, "train.max_nonfinite_steps=3")
    poisoned = run()
    # Steps 3 and 4 (batches 2, 3) were skipped: the state after them equals the state before them, so step 5
    # sees the params step 3 saw; losses before the poison agree exactly with the clean run.
    assert [poisoned.losses[s] for s in (1, 2)] == [clean.losses[s] for s in (1, 2)]
    assert np.isnan(poisoned.losses[3]) and np.isnan(poisoned.losses[4])
    assert np.isfinite(poisoned.losses[5]) and int(poisoned.state.nonfinite_total) == 2
    assert int(poisoned.state.step) == 6
    for leaf in poisoned.state.params["text"]["lm_head"].values():
        assert np.isfinite(np.asarray(leaf)).all()
    records = [json.loads(l) for l in open(tmp_path / "poisoned" / "metrics.jsonl")]
    assert records[-1]["nonfinite_total"] == 2


def test_too_many_nonfinite_steps_in_a_row_stop_the_run(tmp_path):
    _, run = _run(tmp_path, {2, 3, 4, 5}, "train.max_nonfinite_steps=3")
    with pytest.raises(NonFiniteError) as e:
        run()
    assert "3 consecutive steps up to 5 had a non-finite loss" in str(e.value) and "\n" not in str(e.value)
