"""The DPO objective equals TRL's sigmoid DPO loss re-implemented here from full logits (numpy for the loss, plain
jax for the gradients), with label smoothing and the SFT term, for the cross-attention and the unified family;
gradient accumulation splits a batch by whole pairs."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from vlm_jax import sharding
from vlm_jax.config import DpoConfig, SyntheticDataConfig, TrainConfig, load_config
from vlm_jax.families import build_model, get_family, init_params
from vlm_jax.objectives import REFERENCE_LOGPS
from vlm_jax.errors import ConfigError
from vlm_jax.registry import OBJECTIVES
from vlm_jax.train.data import open_train_data
from vlm_jax.train.recipe import resolve_stages
from vlm_jax.train.step import _microbatches, make_reference_step
from train_helpers import ROOT

DPO = DpoConfig(beta=0.3, label_smoothing=0.1, sft_weight=0.5)
PAIRS = 3


def _answer_logps(logits, input_ids, loss_mask, xp, log_softmax):
    """Sum over each row's supervised tokens of log p(token | prefix)."""
    logp = log_softmax(logits[:, :-1])
    targets = xp.clip(input_ids[:, 1:], 0, logits.shape[-1] - 1)  # the image token lies outside the vocabulary
    token = xp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return (token * loss_mask[:, 1:]).sum(-1)


def _trl_loss(policy, reference, loss_mask, xp, log_sigmoid):
    """TRL's DPOTrainer, loss_type="sigmoid" (+ rpo-style NLL on chosen), rows alternating chosen / rejected."""
    pc, pr, rc, rr = policy[0::2], policy[1::2], reference[0::2], reference[1::2]
    logits = DPO.beta * ((pc - pr) - (rc - rr))
    losses = -(1 - DPO.label_smoothing) * log_sigmoid(logits) - DPO.label_smoothing * log_sigmoid(-logits)
    nll = -pc / loss_mask[0::2, 1:].sum(-1)
    return (losses + DPO.sft_weight * nll).mean(), logits


def _np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _np_log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


@pytest.mark.parametrize("config,seq_len", [("tiny_mllama.yaml", 20),
                                            pytest.param("tiny_llava.yaml", 40, marks=pytest.mark.slow)])
def test_dpo_loss_and_gradients_equal_trl_formula(config, seq_len):
    cfg = load_config(f"{ROOT}/configs/models/{config}")
    model, family = build_model(cfg.model), get_family(cfg.model)
    init = jax.jit(lambda rng: nn.meta.unbox(init_params(model, rng)))
    params, ref_params = init(jax.random.PRNGKey(0)), init(jax.random.PRNGKey(1))
    batch = family.synthetic_batch(cfg.model, SyntheticDataConfig(seq_len=seq_len), 2 * PAIRS,
                                   np.random.default_rng(0))
    for k in family.model_inputs:  # a pair shares its prompt's images
        if k in batch and k != "input_ids":
            batch[k][1::2] = batch[k][0::2]
    batch["loss_mask"][:] = 0
    for row in range(2 * PAIRS):  # answers of different lengths
        batch["loss_mask"][row, seq_len - 2 - row:] = 1
    inputs = family.model_kwargs(batch)
    logits = jax.jit(lambda p: model.apply({"params": p}, **inputs))
    ref = _answer_logps(np.asarray(logits(ref_params), np.float64), batch["input_ids"], batch["loss_mask"], np,
                        _np_log_softmax)
    batch[REFERENCE_LOGPS] = ref.astype(np.float32)
    train = TrainConfig(objective="dpo", dpo=DPO, loss_chunk=7)

    def ours(p):
        sums = OBJECTIVES.get("dpo")(model, p, inputs, batch, train)
        return sums.nll / sums.weight, sums

    (loss, sums), grads = jax.jit(jax.value_and_grad(ours, has_aux=True))(params)
    policy = _answer_logps(np.asarray(logits(params), np.float64), batch["input_ids"], batch["loss_mask"], np,
                           _np_log_softmax)
    want, margins = _trl_loss(policy, ref, batch["loss_mask"], np, _np_log_sigmoid)
    assert float(sums.weight) == PAIRS
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    metrics = {k: float(v) / PAIRS for k, v in sums.metrics.items()}
    np.testing.assert_allclose(metrics["reward_margin"], margins.mean(), rtol=1e-4, atol=1e-6)
    assert metrics["reward_accuracy"] == pytest.approx(np.mean(margins > 0))
    np.testing.assert_allclose(metrics["logps_chosen"], policy[0::2].mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["logps_rejected"], policy[1::2].mean(), rtol=1e-5)

    def independent(p):
        pol = _answer_logps(logits(p), batch["input_ids"], jnp.asarray(batch["loss_mask"]), jnp, jax.nn.log_softmax)
        return _trl_loss(pol, jnp.asarray(batch[REFERENCE_LOGPS]), jnp.asarray(batch["loss_mask"]), jnp,
                         jax.nn.log_sigmoid)[0]

    want_grads = jax.jit(jax.grad(independent))(params)
    # fp32 sums in another order: absolute tolerance relative to the largest gradient entry (leaves that get
    # no gradient, like a ViT layer after the feature layer, hold rounding noise of ~1e-13).
    scale = max(float(np.abs(b).max()) for b in jax.tree.leaves(want_grads))
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5 * scale,
                                   err_msg=jax.tree_util.keystr(path))


def test_microbatches_keep_preference_pairs_whole():
    batch = {"x": np.arange(16), "y": np.arange(32).reshape(16, 2)}
    pairs = _microbatches(batch, 2, group=2)
    np.testing.assert_array_equal(pairs["x"], [[0, 1, 4, 5, 8, 9, 12, 13], [2, 3, 6, 7, 10, 11, 14, 15]])
    np.testing.assert_array_equal(pairs["y"][1, :2], [[4, 5], [6, 7]])
    rows = _microbatches(batch, 4, group=1)  # plain rows: every 4th row, as before
    np.testing.assert_array_equal(rows["x"][1], [1, 5, 9, 13])


@pytest.mark.parametrize("overrides,match", [
    (["train.objective=dpx"], "train.objective: unknown objective 'dpx'"),
    (["train.dpo.beta=0"], "train.dpo.beta must be positive"),
    (["train.stages=[{name: dpo, steps: 2, objective: dpo, dpo: {label_smoothing: 0.5}}]"],
     r"train.stages\[0\].dpo.label_smoothing must be in \[0, 0.5\)"),
    (["train.objective=dpo", "train.synthetic.enabled=true", "workdir=/tmp/unused"],
     "stage 'train': objective 'dpo' reads preference pairs, which the 'synthetic' data"),
])
def test_dpo_config_mistakes_are_one_line(overrides, match):
    with pytest.raises(ConfigError, match=match):
        open_train_data(*_staged(load_config(f"{ROOT}/configs/models/tiny_mllama.yaml", ["train.steps=2", *overrides])))


def _staged(cfg):
    return cfg, resolve_stages(cfg.train), get_family(cfg.model)


def test_the_reference_pass_in_microbatches_gives_each_row_its_own_logp():
    """The frozen reference scores a batch in the train step's microbatches (pairs kept whole) and hands back one
    log-prob per row in the batch's own order."""
    cfg = load_config(f"{ROOT}/configs/models/tiny_mllama.yaml", ["train.objective=dpo", "train.steps=2"])
    model, family = build_model(cfg.model), get_family(cfg.model)
    params = jax.jit(lambda rng: nn.meta.unbox(init_params(model, rng)))(jax.random.PRNGKey(0))
    batch = family.synthetic_batch(cfg.model, SyntheticDataConfig(seq_len=20), 8, np.random.default_rng(0))
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
    replicated = NamedSharding(mesh, PartitionSpec())
    params_sh = jax.tree.map(lambda _: replicated, params)
    batch_sh = {k: replicated for k in [*batch, REFERENCE_LOGPS]}
    stage = resolve_stages(cfg.train)[0]
    logps = {n: np.asarray(make_reference_step(model, dataclasses.replace(cfg.train, microbatches=n), stage,
                                               params_sh, batch_sh, mesh, sharding.load_rules(cfg.mesh.rules))(
                 params, batch)) for n in (1, 2, 4)}
    assert logps[1].shape == (8,) and len(set(np.round(logps[1], 3))) == 8  # distinct: a wrong order would show
    for n in (2, 4):
        np.testing.assert_allclose(logps[n], logps[1], rtol=1e-6, err_msg=f"{n} microbatches")
