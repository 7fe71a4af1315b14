"""Exact resume after SIGKILL, SIGTERM and Ctrl-C (real subprocesses running `vlm-jax train`), and a kill during
an async save leaves the previous checkpoint restorable."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from vlm_jax.train import checkpoint
from vlm_jax.train.loop import Trainer, train
from vlm_jax.train.preemption import StopSignal
from train_helpers import ROOT, SMALL_RUN, TINY, final_params, tiny_config

RUN = ["train.synthetic.enabled=true", "train.steps=30", "train.log.every_steps=1", "train.checkpoint.every_steps=5"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run's workdir."""
    workdir = str(tmp_path_factory.mktemp("reference"))
    train(tiny_config(workdir, *RUN), echo=lambda _: None)
    return workdir


def _assert_same_params(workdir, reference):
    want, got = final_params(reference), final_params(workdir)
    assert want.keys() == got.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def _spawn(workdir, *overrides):
    cmd = [sys.executable, "-m", "vlm_jax.cli", "train", "--config", TINY, f"workdir={workdir}", *SMALL_RUN,
           "train.synthetic.enabled=true", *RUN, *overrides]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _committed(workdir):
    directory = os.path.join(workdir, "checkpoints")
    return sorted(int(d) for d in os.listdir(directory) if d.isdigit()) if os.path.isdir(directory) else []


def _wait_for(predicate, proc, timeout=240.0, poll=0.02):
    deadline = time.time() + timeout
    while time.time() < deadline:
        exited = proc.poll() is not None  # read before the predicate: a run may commit, then exit, in between
        if predicate():
            return True
        assert not exited, proc.communicate()[0][-2000:]
        time.sleep(poll)
    raise AssertionError("timed out waiting for the training subprocess")


def _logged_steps(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line)["step"] for line in f]


def test_resume_after_sigkill_and_sigterm_is_bitwise_exact(reference, tmp_path):
    workdir = str(tmp_path / "interrupted")
    slow = "train.synthetic.delay_s=0.3"  # input latency so the signals land mid-run
    proc = _spawn(workdir, slow)
    _wait_for(lambda: any(s >= 10 for s in _committed(workdir)), proc)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    killed_at = max(_committed(workdir))
    assert 10 <= killed_at < 30

    proc = _spawn(workdir, slow)
    _wait_for(lambda: max(_committed(workdir)) > killed_at, proc)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out[-2000:]
    assert f"resumed from {os.path.join(workdir, 'checkpoints')} step {killed_at}" in out
    assert "stopped by SIGTERM at step" in out
    stopped_at = max(_committed(workdir))
    assert stopped_at < 30

    proc = _spawn(workdir)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out[-2000:]
    assert f"step {stopped_at}" in out and "finished at step 30" in out

    assert _logged_steps(workdir) == list(range(1, 31))  # no gaps, no repeats
    _assert_same_params(workdir, reference)


def test_ctrl_c_saves_at_the_next_step_and_resume_is_bitwise_exact(reference, tmp_path):
    workdir = str(tmp_path / "interrupted")
    proc = _spawn(workdir, "train.synthetic.delay_s=0.3")
    _wait_for(lambda: _committed(workdir), proc)
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out[-2000:]
    assert "Ctrl-C: saving a checkpoint after this step" in out
    stopped_at = max(_committed(workdir))
    assert 5 <= stopped_at < 30 and f"stopped by SIGINT at step {stopped_at}; checkpoint saved" in out, out[-2000:]

    out = _spawn(workdir).communicate(timeout=300)[0]
    assert f"step {stopped_at}" in out and "finished at step 30" in out, out[-2000:]
    assert _logged_steps(workdir) == list(range(1, 31))
    _assert_same_params(workdir, reference)


def test_a_second_ctrl_c_aborts_at_once():
    with StopSignal() as stop:
        assert stop.agreed() == ""
        signal.raise_signal(signal.SIGINT)
        assert stop.agreed() == "SIGINT"  # the first one only asks for a save at the next step boundary
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)


def test_kill_during_async_save_leaves_restorable_checkpoint(tmp_path):
    workdir = str(tmp_path / "run")
    ckpt_dir = os.path.join(workdir, "checkpoints")
    proc = _spawn(workdir, "train.checkpoint.every_steps=1", "train.synthetic.delay_s=0.05")
    _wait_for(lambda: _committed(workdir) and checkpoint.incomplete_steps(ckpt_dir), proc, poll=0.002)
    proc.send_signal(signal.SIGKILL)  # a save is in flight: its step has only a tmp directory
    proc.wait()
    committed = _committed(workdir)
    assert committed
    # The interrupted step never counts: restore picks the newest committed step and warns about the rest.
    messages = []
    trainer = Trainer(tiny_config(workdir, *RUN), echo=messages.append)
    with checkpoint.train_manager(ckpt_dir, max_to_keep=3, keep_every=0, async_save=False) as mgr:
        state, _, data_iter = trainer.restore(mgr)
    assert int(state.step) == max(committed) and data_iter["iter"]["position"] == max(committed)
    leftovers = checkpoint.incomplete_steps(ckpt_dir)
    assert all(any(name in m for m in messages) for name in leftovers)
