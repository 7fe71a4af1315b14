"""The reward model (model.reward_head, train.objective: reward): its Bradley-Terry + drift loss and gradient equal
a numpy formula; an answer's score is read at its last supervised token, for the cross-attention and the unified
family; a tiny reward model trains through `train()` and logs its held-out pairwise accuracy; it starts from an
SFT checkpoint without the head (and from nothing else missing); `vlm-jax score` scores a JSONL file end to end."""
import dataclasses
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from train_helpers import ROOT, tiny_config
from vlm_jax import cli
from vlm_jax.config import SyntheticDataConfig, load_config
from vlm_jax.convert import export_config, parameter_counts
from vlm_jax.errors import ConfigError, ConversionError
from vlm_jax.families import build_model, get_family, init_params
from vlm_jax.objectives.reward import reward_scores, reward_terms
from vlm_jax.train import checkpoint
from vlm_jax.train.init_from import InitFromError
from vlm_jax.train.loop import Trainer, train

EXAMPLE = os.path.join(ROOT, "configs", "examples", "reward_mllama.yaml")


def _np_terms(scores, supervised, w):
    """Per-pair loss and d(total loss)/d(scores), written out by hand."""
    c, r = scores[0::2].astype(np.float64), scores[1::2].astype(np.float64)
    valid = supervised[0::2] > 0
    margin, mean = c - r, (c + r) / 2
    loss = np.logaddexp(0.0, -margin) + w * mean ** 2
    sig = 1 / (1 + np.exp(-margin))
    grad = np.zeros_like(scores, np.float64)
    grad[0::2] = np.where(valid, -(1 - sig) + w * mean, 0)
    grad[1::2] = np.where(valid, (1 - sig) + w * mean, 0)
    return loss[valid].sum(), grad, valid.sum()


def test_loss_and_its_gradient_equal_the_formula():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=10).astype(np.float32) * 3
    supervised = np.array([3, 4, 0, 0, 2, 5, 1, 1, 7, 2], np.float32)  # the second pair is padding
    w = 0.3
    (total, sums), grad = jax.value_and_grad(lambda s: (lambda t: (t.nll, t))(reward_terms(s, supervised, w)),
                                             has_aux=True)(jnp.asarray(scores))
    want, want_grad, pairs = _np_terms(scores, supervised, w)
    np.testing.assert_allclose(float(total), want, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-5, atol=1e-6)
    assert float(sums.weight) == pairs == 4
    margins = (scores[0::2] - scores[1::2])[supervised[0::2] > 0]
    np.testing.assert_allclose(float(sums.metrics["reward_accuracy"]), np.sum(margins > 0))
    np.testing.assert_allclose(float(sums.metrics["score_margin"]), margins.sum(), rtol=1e-5)


@pytest.mark.parametrize("config,seq_len", [("tiny_mllama.yaml", 16),
                                            pytest.param("tiny_llava.yaml", 40, marks=pytest.mark.slow)])
def test_score_is_read_at_the_last_supervised_token(config, seq_len):
    cfg = load_config(f"{ROOT}/configs/models/{config}", ["model.reward_head=true", "model.dtype=float32"])
    model, family = build_model(cfg.model), get_family(cfg.model)
    params = jax.jit(lambda rng: nn.meta.unbox(init_params(model, rng)))(jax.random.PRNGKey(0))
    head = params["text"]["reward_head"]
    assert not np.asarray(head["kernel"]).any()  # a fresh head scores every answer 0
    head["kernel"] = jax.random.normal(jax.random.PRNGKey(1), head["kernel"].shape)
    batch = family.synthetic_batch(cfg.model, SyntheticDataConfig(seq_len=seq_len), 2, np.random.default_rng(0))
    last = seq_len - 4
    batch["loss_mask"][:] = 0
    batch["loss_mask"][:, last - 2:last + 1] = 1  # the answer ends at `last`; right padding follows
    free = np.flatnonzero(batch["input_ids"][0] != cfg.model.image_token_index)  # text positions
    @jax.jit
    def score_and_hidden(b):
        inputs = family.model_kwargs(b)
        return (reward_scores(model, params, inputs, b["loss_mask"]),
                model.apply({"params": params}, **inputs, return_hidden=True))

    base, hidden = score_and_hidden(batch)
    base = np.asarray(base)
    np.testing.assert_allclose(base, np.asarray(hidden[:, last] @ head["kernel"])[:, 0] + head["bias"][0], rtol=1e-5)

    def changed(position):
        b = {k: v.copy() for k, v in batch.items()}
        b["input_ids"][0, position] = (b["input_ids"][0, position] + 1) % 3 + 3  # another word, not an image token
        return np.asarray(score_and_hidden(b)[0])

    after = changed(free[free > last][0])
    assert after[0] == base[0] and after[1] == base[1]  # a token after the answer (padding) changes nothing
    assert changed(last - 1)[0] != base[0]  # a token of the answer does


def test_init_from_an_sft_checkpoint_adds_only_the_head(tmp_path, capsys):
    cfg = tiny_config(str(tmp_path / "unused"), "train.steps=1")
    sft = jax.jit(lambda rng: nn.meta.unbox(init_params(build_model(cfg.model), rng)))(jax.random.PRNGKey(3))
    source, partial = str(tmp_path / "sft"), str(tmp_path / "partial")
    checkpoint.save_params(source, sft, cfg)
    checkpoint.save_params(partial, {k: v for k, v in sft.items() if k != "projector"}, cfg)
    lines = []
    trainer = Trainer(tiny_config(str(tmp_path / "run"), "train.steps=1", "model.reward_head=true",
                                  f"train.init_from={source}"), echo=lines.append)
    params = trainer.fresh_state(trainer.init_source()).params
    assert any("reward_head starts at zero" in line for line in lines)
    assert not np.asarray(params["text"]["reward_head"]["kernel"]).any()
    got = checkpoint.leaf_paths({**params, "text": {k: v for k, v in params["text"].items() if k != "reward_head"}})
    want = checkpoint.leaf_paths(sft)
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=k)

    with pytest.raises(InitFromError, match=r"params/projector/\S+ is absent there"):
        Trainer(tiny_config(str(tmp_path / "run2"), "train.steps=1", "model.reward_head=true",
                            f"train.init_from={partial}"), echo=lambda _: None).init_source()
    (tmp_path / "r.jsonl").write_text("{}\n")
    assert cli.main(["score", "--checkpoint", source, "--jsonl", str(tmp_path / "r.jsonl")]) == 2
    assert "is no reward model" in capsys.readouterr().err


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("reward"))
    cfg = load_config(EXAMPLE, [f"workdir={workdir}", "train.steps=4", "train.eval_every=2", "train.log.every_steps=1",
                                "data.shapes.batch_size=8",
                                "data.eval_sources=[{kind: embedded_preference, name: shapes_color, split: test, size: 8}]",
                                "train.checkpoint={every_steps: 4, async_save: false}", "mesh.fsdp=-1"])
    return workdir, train(cfg, devices=jax.devices()[:2], echo=lambda _: None)


@pytest.mark.slow  # compiles a train and an eval step (~30 s on a loaded 2-core machine)
def test_tiny_reward_model_trains_and_logs_held_out_accuracy(reward_run):
    workdir, result = reward_run
    assert all(np.isfinite(result.losses[s]) for s in range(1, 5))
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    evals = {r["step"]: r for r in records if "eval_loss" in r}
    assert sorted(evals) == [2, 4]
    for r in evals.values():
        assert 0 <= r["eval_reward_accuracy"] <= 1 and {"eval_score_margin", "eval_score_mean"} <= r.keys()
    assert "reference_logps" not in str(records) and not os.path.exists(os.path.join(workdir, "reference"))
    head = checkpoint.restore_params(os.path.join(workdir, "checkpoints"))["text"]["reward_head"]
    assert np.asarray(head["kernel"]).any()  # trained away from its zero init


@pytest.mark.slow  # scores with the run above
def test_score_cli_scores_records_of_both_kinds(reward_run, tmp_path):
    workdir, _ = reward_run
    Image.fromarray(np.full((20, 20, 3), (200, 30, 30), np.uint8)).save(tmp_path / "red.png")
    prompt = [{"from": "human", "value": "<image>What color is the shape?"}]
    lines = [{"image": "red.png", "conversations": prompt, "chosen": "red", "rejected": "blue"},
             {"image": "red.png", "conversations": prompt + [{"from": "gpt", "value": "red"}]},
             {"image": "missing.png", "conversations": prompt, "chosen": "red", "rejected": "blue"}]
    (tmp_path / "r.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    out = tmp_path / "scores.json"
    assert cli.main(["score", "--checkpoint", os.path.join(workdir, "checkpoints"), "--config", EXAMPLE,
                     f"data.eval_sources=[{{kind: jsonl, name: r, path: {tmp_path / 'r.jsonl'}}}]",
                     "data.max_bad_fraction=1.0", "--json", str(out)]) == 0
    (result,) = json.loads(out.read_text())
    assert (result["records"], result["pairs"], result["skipped"]) == (2, 1, 1)
    pair, sft = result["scores"]
    assert sft["score"] == pytest.approx(pair["chosen_score"], abs=1e-5)  # the same answer, the same score
    margin = pair["chosen_score"] - pair["rejected_score"]
    assert result["pairwise_accuracy"] == (margin > 0) + 0.5 * (margin == 0)


def test_a_reward_model_is_counted_but_not_exported():
    m = load_config(EXAMPLE).model
    counts = parameter_counts(m)
    hidden = m.text.hidden_size
    assert counts["text.reward_head"] == hidden + 1
    assert counts["total"] == parameter_counts(dataclasses.replace(m, reward_head=False))["total"] + hidden + 1
    with pytest.raises(ConversionError, match="model.reward_head: a reward model has no Hugging Face layout"):
        export_config(m)


@pytest.mark.parametrize("overrides,match", [
    (["model.reward_head=false"], r"train.objective 'reward' trains the scalar reward head.*model.reward_head=true"),
    (["train.reward.drift_weight=-1"], r"train.reward.drift_weight must be >= 0, got -1"),
    (["train.stages=[{name: rm, steps: 2, reward: {drift_weight: -0.5}}]"], r"train.stages\[0\].reward.drift_weight"),
])
def test_bad_reward_settings_are_one_line_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(EXAMPLE, overrides)
