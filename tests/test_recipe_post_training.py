"""The whole tiny recipe (configs/recipes/tiny_llama3v.yaml) under `vlm-jax train`, its steps cut to a few:
pretrain -> anneal -> SFT sweep + greedy soup -> reward model -> rejection sampling -> SFT on the samples (a sweep
against SFT without them) -> DPO on the sampled pairs and synthetic ones.
A second run is SIGKILLed in three stages (a sweep variant, the reward model, DPO) and run again each time; it
ends with the uninterrupted run's soup, sampled data, accuracies and final parameters, bitwise. The config checks of
the new stage kinds are one line each."""
import json
import os
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest

from vlm_jax import cli, recipe
from vlm_jax.config import load_config
from vlm_jax.data.sources.jsonl import parse_record
from vlm_jax.errors import ConfigError, UserError
from vlm_jax.infer.sample import SampleResult
from vlm_jax.recipe import check_sampled
from vlm_jax.train import checkpoint
from vlm_jax.train import optimizer as opt
from vlm_jax.train.loop import Trainer
from vlm_jax.train.recipe import resolve_stages
from train_helpers import ROOT, final_params, xla_flags

RECIPE = os.path.join(ROOT, "configs", "recipes", "tiny_llama3v.yaml")
# Stage lengths: pretrain 6, anneal 2, each sweep variant 2 (the soup is step 10), reward model 2 (its own run),
# sampling, SFT on the samples 2 (a sweep too: the better variant is step 12), DPO 2.
SHORT = ["train.stages.0.steps=6", "train.stages.1.steps=2", "train.stages.2.steps=2", "train.stages.3.steps=2",
         "train.stages.5.steps=2", "train.stages.6.steps=2",
         "train.stages.2.sweep.variants=[{train.schedule.learning_rate: 1.0e-3}, {train.schedule.learning_rate: 1.0e-4}]",
         "train.stages.2.sweep.eval_examples=3", "train.eval_examples=3",
         # A barely trained policy answers nothing right: the reward model judges, and each prompt's best is kept.
         "train.stages.4.sample.verifier=", "train.stages.4.sample.reward_model=reward_model",
         "train.stages.4.sample.threshold=-1.0e9", "train.stages.4.sample.limit=3", "train.stages.4.sample.num_samples=2",
         "train.log.tensorboard=false", "train.checkpoint.async_save=false", "train.checkpoint.max_to_keep=10"]


def _spawn(workdir: str, n: int):
    """`vlm-jax train` of the short recipe on one CPU device; output to <workdir>.<n>.log (a pipe could fill)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(1)}
    log = open(f"{workdir}.{n}.log", "w")
    cmd = [sys.executable, "-m", "vlm_jax.cli", "train", "--config", RECIPE, f"workdir={workdir}", *SHORT]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def _finish(proc, workdir: str, n: int) -> str:
    proc.wait(timeout=900)
    out = open(f"{workdir}.{n}.log").read()
    assert proc.returncode == 0, out[-3000:]
    return out


def _kill_when(path: str, proc, workdir: str, n: int, timeout=900.0):
    """SIGKILL `proc` as soon as `path` exists (the stage it belongs to has begun)."""
    deadline = time.time() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None, open(f"{workdir}.{n}.log").read()[-3000:]
        assert time.time() < deadline, f"timed out waiting for {path}"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL


@pytest.mark.slow  # ~3 min idle: a dozen programs compile once (the killed run reads them from the cache)
def test_tiny_recipe_runs_every_stage_and_a_sigkill_in_any_stage_resumes_exactly(tmp_path):
    reference = str(tmp_path / "uninterrupted")
    out = _finish(_spawn(reference, 0), reference, 0)
    assert "finished at step 14" in out and "held-out accuracy after each stage" in out
    stages = tmp_path / "uninterrupted" / "stages"
    assert sorted(int(s) for s in os.listdir(os.path.join(reference, "checkpoints"))) == [6, 8, 10, 12, 14]

    # The soup at step 10 is the float32 mean of the variants it kept (greedy keeps the best one at least).
    soup = json.loads((stages / "sft" / "soup.json").read_text())
    kept = [i for i, ingredient in enumerate(soup["ingredients"]) if ingredient["kept"]]
    assert kept and soup["soup"]["accuracy"] >= max(ingredient["accuracy"] for ingredient in soup["ingredients"])
    variants = [final_params(str(stages / "sft" / str(i))) for i in kept]
    souped = final_params(reference, step=10)
    for path, value in souped.items():
        expected = np.mean(np.stack([v[path] for v in variants]), axis=0, dtype=np.float32)
        np.testing.assert_array_equal(value, expected, err_msg=path)

    # The reward model: the policy's parameters plus a head, trained in its own run.
    reward = final_params(str(stages / "reward_model"))
    assert set(reward) - set(souped) == {"text/reward_head/kernel", "text/reward_head/bias"}

    # The sampled dataset: one record per prompt (every best answer kept), read by the SFT stage after it.
    lines = (stages / "rejection_sampling" / "data.jsonl").read_text().splitlines()
    assert len(lines) == 12  # 3 prompts of each of the stage's 4 sources
    for line in lines:
        record = parse_record(line.encode(), stages / "rejection_sampling")
        assert record["turns"][-1][0] == "assistant" and record["turns"][-1][1]
        assert all(os.path.exists(image) for image in record["images"])
    # Its pairs, which DPO reads: a kept answer against a lower-scored one.
    pairs = (stages / "rejection_sampling" / "pairs.jsonl").read_text().splitlines()
    assert 0 < len(pairs) <= 12
    for line in pairs:
        record = parse_record(line.encode(), stages / "rejection_sampling")
        assert record["chosen"] != record["rejected"] and json.loads(line)["rejected_score"] < json.loads(line)["score"]

    # SFT on the samples against SFT without them: the max "soup" is the better one, unchanged.
    sampled_sft = json.loads((stages / "sft_sampled" / "soup.json").read_text())
    [better] = [i for i, ingredient in enumerate(sampled_sft["ingredients"]) if ingredient["kept"]]
    after_sampled_sft = final_params(reference, step=12)
    variant = final_params(str(stages / "sft_sampled" / str(better)))
    assert all(np.array_equal(after_sampled_sft[p], variant[p]) for p in variant)

    # DPO's frozen reference is the model the stage started from.
    dpo_reference = opt.flatten(checkpoint.restore_params(os.path.join(reference, "reference", "6")))
    assert dpo_reference.keys() == after_sampled_sft.keys()
    assert all(np.array_equal(dpo_reference[p], after_sampled_sft[p]) for p in dpo_reference)

    # Held-out accuracy after every stage that changed the run's model.
    accuracy = json.loads((stages / "accuracy.json").read_text())
    assert list(accuracy) == ["pretrain", "anneal", "sft", "sft_sampled", "dpo"]
    assert [row["step"] for row in accuracy.values()] == [6, 8, 10, 12, 14]

    # SIGKILLed as the sweep's second variant starts, as the reward model starts, and in DPO; each run goes on.
    workdir = str(tmp_path / "killed")
    for n, path in enumerate(["stages/sft/1/checkpoints", "stages/reward_model/checkpoints", "reference/6"]):
        _kill_when(os.path.join(workdir, path), _spawn(workdir, n), workdir, n)
    out = _finish(_spawn(workdir, 3), workdir, 3)
    assert "finished at step 14" in out
    for step in (10, 14):
        want, got = final_params(reference, step=step), final_params(workdir, step=step)
        for name in want:
            np.testing.assert_array_equal(got[name], want[name], err_msg=f"step {step}: {name}")
    for name in ("rejection_sampling/data.jsonl", "rejection_sampling/pairs.jsonl", "accuracy.json"):
        assert (tmp_path / "killed" / "stages" / name).read_text() == (stages / name).read_text()

    # Once more: nothing is trained, sampled or souped again.
    again = _finish(_spawn(workdir, 4), workdir, 4)
    assert "nothing to train: the run is at step 14" in again
    assert "training" not in again and "soup of" not in again and "kept" not in again


@pytest.mark.parametrize("overrides, needle", [
    (["train.stages.4.sample.verifier=", "train.stages.4.sample.reward_model=sft"], "train.stages[4].sample.reward_model: 'sft' is no earlier stage of kind reward_model"),
    (["train.stages.5.data.sources.0.stage=dpo"], "train.stages[5].data.sources[0].stage: 'dpo' is no earlier stage of kind sample"),
    (["train.stages.2.sweep.variants=[{train.schedule.learning_rate: 1.0e-3}]"], "train.stages[2].sweep.variants: 1 given"),
    (["train.stages.2.sweep.variants.0={model.text.hidden_size: 64}"], "is not a train.*, data.* or seed key"),
    (["train.stages.3.objective=dpo"], "train.stages[3] trains a reward model (objective reward); remove objective 'dpo'"),
    (["train.stages.4.steps=3"], "train.stages[4] is a sample stage: give its `sample:` settings and no steps"),
    (["train.stages.0.kind=sample"], "train.stages[0] is a 'sample' stage, which needs a model trained by an earlier stage"),
    (["train.stages.1.name=pretrain"], "train.stages[1].name 'pretrain' is already train.stages[0]'s"),
    (["train.stages.5.data.sources.0.kind=embedded"], "train.stages[5].data.sources[0].stage names a recipe stage's output"),
    (["train.stages.6.data.sources.0.stage_output=best"], "train.stages[6].data.sources[0].stage_output 'best' is none of answers, pairs"),
])
def test_bad_recipe_stages_are_one_line(tmp_path, capsys, overrides, needle):
    assert cli.main(["train", "--config", RECIPE, f"workdir={tmp_path}", *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not os.listdir(tmp_path)


def test_a_sweep_is_not_trained_by_the_trainer_alone(tmp_path):
    cfg = load_config(RECIPE, [f"workdir={tmp_path}", *SHORT])
    with pytest.raises(ConfigError, match="stage 'sft' \\(step 8\\) sweeps 2 variants, which the recipe runner trains"):
        Trainer(cfg, echo=lambda m: None)
    assert not os.listdir(tmp_path)


def test_several_processes_run_the_recipe_up_to_its_first_one_process_stage(tmp_path, monkeypatch):
    """A pod runs the adapter stages (cut by train.steps); the sweeps, reward model and sampling are refused in
    one line that says where to cut, and only when the run would reach them before they are done."""
    def on_a_pod(overrides=()):
        with monkeypatch.context() as patched:
            patched.setattr(recipe, "jax", types.SimpleNamespace(process_count=lambda: 8))  # recipe.py's view only
            return recipe.Recipe(load_config(RECIPE, [f"workdir={tmp_path}", *overrides]))

    with pytest.raises(ConfigError, match=r"stage 'sft' \(a sweep\) runs in one process, and this run has 8: set "
                                          r"train.steps=600 to train the stages before it here, then run up to step "
                                          r"700 on one host \(train.steps=700\); the stages after it train here again"):
        on_a_pod()
    for steps in (600, 550):
        stages = on_a_pod([f"train.steps={steps}"]).stages
        assert [s.name for s in stages if s.start < steps] == ["pretrain", "anneal"]

    # Once one host has done them in the workdir, the pod trains the stages after them.
    def commit(directory, step):
        checkpoint.save_params(str(directory), {"w": np.zeros(2, np.float32)}, load_config(RECIPE), step=step)
    commit(tmp_path / "checkpoints", 660)  # the sft sweep's soup
    commit(tmp_path / "stages" / "reward_model" / "checkpoints", 800)
    (tmp_path / "stages" / "rejection_sampling").mkdir()
    (tmp_path / "stages" / "rejection_sampling" / "data.jsonl").write_text("")
    with pytest.raises(ConfigError, match=r"stage 'sft_sampled' \(a sweep\) runs in one process, and this run has "
                                          r"8: set train.steps=660 to train the stages before it here, then run up to "
                                          r"step 700 on one host"):
        on_a_pod()
    commit(tmp_path / "checkpoints", 700)
    pod = on_a_pod()
    assert all(pod.done(s) for s in pod.stages if not s.trains_in_place)


def test_a_sample_stage_that_leaves_a_later_stage_nothing_stops_in_one_line(tmp_path):
    cfg = load_config(RECIPE, [f"workdir={tmp_path}"])
    stage = next(s for s in resolve_stages(cfg.train) if s.kind == "sample")
    kept = {"record": {}, "score": 1.0, "rejected": None, "rejected_score": 1.0}
    none_kept, no_pairs = SampleResult("a", 2, 4, [], [0.0]), SampleResult("a", 2, 4, [kept], [1.0])
    with pytest.raises(UserError, match=r"^stage 'rejection_sampling' kept none of 2 prompts' answers"):
        check_sampled(stage, [none_kept], [])
    with pytest.raises(UserError, match=r"made no preference pairs .*which stage 'dpo' trains on; raise "
                                        r"train\.stages\[4\]\.sample\.num_samples"):
        check_sampled(stage, [no_pairs], ["dpo"])
    check_sampled(stage, [no_pairs], [])  # no stage reads its pairs
    check_sampled(stage, [SampleResult("a", 2, 4, [{**kept, "rejected": "x"}], [1.0])], ["dpo"])
