"""Restores are loud, never silently fresh. A checkpoint that does not fit the current config (a parameter's shape
or dtype, the trainable set, the optimizer) stops `vlm-jax train` with one line naming the step, the first
differing path and both sides, exit 2, and leaves every file in the workdir byte-for-byte as it was. A damaged
newest step falls back to the previous committed one with a warning; a damaged only step is an error."""
import hashlib
import os
import shutil

import pytest

from vlm_jax import cli
from vlm_jax.train import checkpoint
from vlm_jax.train.loop import Trainer, train
from train_helpers import SMALL_RUN, TINY, tiny_config

RUN = ["train.steps=2", "train.checkpoint.every_steps=1"]  # commits steps 1 and 2


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("run") / "run")
    train(tiny_config(workdir, *RUN), echo=lambda _: None)
    return workdir


def _copy(run, tmp_path) -> str:
    return shutil.copytree(run, str(tmp_path / "run"))


def _hashes(workdir) -> dict[str, str]:
    out = {}
    for root, _, files in os.walk(workdir):
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                out[os.path.relpath(os.path.join(root, f), workdir)] = hashlib.sha1(fh.read()).hexdigest()
    return out


def _damage(workdir, step):
    """Truncates the largest file of the step's params (an array's data) to half its size."""
    files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(workdir, "checkpoints", str(step), "params"))
             for f in fs]
    largest = max(files, key=os.path.getsize)
    with open(largest, "r+b") as f:
        f.truncate(os.path.getsize(largest) // 2)


def _refused(workdir, capsys, *overrides) -> str:
    """Runs `vlm-jax train` on to step 4: it must exit 2 with one line on stderr and change no file."""
    before = _hashes(workdir)
    assert any(p.endswith("metrics.jsonl") for p in before)
    code = cli.main(["train", "--config", TINY, f"workdir={workdir}", *SMALL_RUN, "train.synthetic.enabled=true",
                     "train.steps=4", *overrides])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert _hashes(workdir) == before
    return err


@pytest.mark.parametrize("override,want", [
    ("model.text.hidden_size=96", "params/projector/bias is float32[64] there but float32[96] now"),
    ("model.param_dtype=bfloat16", "params/projector/bias is float32[64] there but bfloat16[64] now"),
    ("train.frozen=[vision/.*]", "opt_state/1/mu/vision/class_embedding is float32[32] there but absent now"),
    ("train.optimizer.clip_norm=0", "opt_state/0/count is absent there but int32[] now"),
], ids=["width", "param_dtype", "frozen", "optimizer"])
def test_a_checkpoint_that_does_not_fit_the_config_is_refused(run, tmp_path, capsys, override, want):
    err = _refused(_copy(run, tmp_path), capsys, override)
    assert "checkpoint step 2 in" in err and "does not fit the config" in err and want in err, err


@pytest.mark.parametrize("override,want", [
    ("model.vision.intermediate_layers_convention=output",
     "was trained with model.vision.intermediate_layers_convention='input' but the config says 'output'"),
    ("model.text.rope_theta=20000.0", "was trained with model.text.rope_theta=10000.0 but the config says 20000.0"),
], ids=["vision_layer_convention", "rope_theta"])
def test_a_checkpoint_of_another_model_with_equal_shapes_is_refused(run, tmp_path, capsys, override, want):
    """Same shapes, different function: resuming would silently train another model than the one saved."""
    err = _refused(_copy(run, tmp_path), capsys, override)
    assert "checkpoint step 2 in" in err and want in err, err


def test_a_damaged_newest_step_falls_back_to_the_previous_one(run, tmp_path):
    workdir = _copy(run, tmp_path)
    _damage(workdir, 2)
    messages = []
    trainer = Trainer(tiny_config(workdir, *RUN), echo=messages.append)
    with checkpoint.train_manager(os.path.join(workdir, "checkpoints"), max_to_keep=3, keep_every=0,
                                  async_save=False) as mgr:
        state, _, data_iter = trainer.restore(mgr)
    assert int(state.step) == 1 and data_iter["iter"]["position"] == 1
    assert any("checkpoint step 2 is unreadable" in m and "falling back to step 1" in m for m in messages), messages


def test_a_damaged_only_step_is_an_error_not_a_fresh_start(run, tmp_path, capsys):
    workdir = _copy(run, tmp_path)
    shutil.rmtree(os.path.join(workdir, "checkpoints", "1"))
    _damage(workdir, 2)
    err = _refused(workdir, capsys)
    assert "checkpoint step 2 in" in err and "is unreadable" in err and "no earlier committed step" in err, err
