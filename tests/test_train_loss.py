"""Chunked cross-entropy equals the full-logits loss; optimizer masks, schedules, learning-rate groups, and the
update equal to optax's chain with its non-finite guard."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vlm_jax.config import LrGroup, OptimizerConfig, ScheduleConfig, TrainConfig, load_config
from vlm_jax.families import build_model, init_params
import flax.linen as nn
from vlm_jax.objectives import next_token as losses
from vlm_jax.train import optimizer as opt
from vlm_jax.families import get_family
from vlm_jax.train.step import loss_sums
from train_helpers import TINY


@pytest.fixture(scope="module")
def tiny():
    cfg = load_config(TINY, ["train.synthetic.seq_len=20"])
    model = build_model(cfg.model)
    params = jax.jit(lambda rng: nn.meta.unbox(init_params(model, rng)))(jax.random.PRNGKey(0))
    batch = get_family(cfg.model).synthetic_batch(cfg.model, cfg.train.synthetic, 3, np.random.default_rng([0, 0]))
    batch["loss_mask"][0, 3:9] = 1.0  # ragged supervision
    return model, params, batch


def test_chunked_loss_and_gradients_equal_full_logits(tiny):
    model, params, batch = tiny
    inputs = {k: v for k, v in batch.items() if k != "loss_mask"}
    targets, weights = losses.next_token_targets(batch["input_ids"], batch["loss_mask"])

    def full(p):
        sums = losses.full_logits_loss(model.apply({"params": p}, **inputs), targets, weights)
        return sums.nll, sums

    def chunked(p, chunk):
        sums = loss_sums(model, p, batch, TrainConfig(loss_chunk=chunk))
        return sums.nll, sums

    (_, want), g_full = jax.jit(jax.value_and_grad(full, has_aux=True))(params)
    for chunk in (7, 20, 64):  # uneven (padded), exact, larger than the sequence
        got = jax.jit(lambda p: chunked(p, chunk)[1])(params)
        assert float(got.weight) == float(batch["loss_mask"][:, 1:].sum())
        np.testing.assert_allclose(float(got.nll), float(want.nll), rtol=1e-6)
        np.testing.assert_allclose(float(got.z), float(want.z), rtol=1e-6)
    _, g_chunked = jax.jit(jax.value_and_grad(lambda p: chunked(p, 7), has_aux=True))(params)
    for a, b in zip(jax.tree.leaves(g_chunked), jax.tree.leaves(g_full)):
        b = np.asarray(b)  # fp32 sums in another order: tolerance relative to the leaf's scale
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-4, atol=1e-5 * np.abs(b).max())


def test_loss_counts_only_supervised_next_tokens():
    logits = jnp.zeros((1, 4, 5)).at[0, 1, 2].set(50.0)  # position 1 predicts token 2 confidently
    ids = jnp.array([[0, 1, 2, 3]])
    only_pos2 = jnp.array([[0.0, 0.0, 1.0, 0.0]])
    sums = losses.full_logits_loss(logits, *losses.next_token_targets(ids, only_pos2))
    assert float(sums.weight) == 1.0 and float(sums.nll) < 1e-6
    sums = losses.full_logits_loss(logits, *losses.next_token_targets(ids, jnp.array([[0.0, 0.0, 0.0, 1.0]])))
    assert float(sums.nll) == pytest.approx(np.log(5), rel=1e-6)


def test_weight_decay_skips_norms_biases_gates_embeddings():
    paths = ["text/decoder/layer_1/mlp/gate_proj/kernel", "text/decoder/layer_1/attn_gate", "vision/gate_attn",
             "vision/transformer/mlp/fc1/bias", "text/norm/scale", "text/decoder/layer_1/cross_attn/q_norm/scale",
             "text/embed_tokens/embedding", "vision/tile_position_embedding", "text/lm_head/kernel"]
    decayed = {p for p in paths if not opt.full_match(p, OptimizerConfig().no_decay)}
    assert decayed == {"text/decoder/layer_1/mlp/gate_proj/kernel", "text/lm_head/kernel"}


def test_schedules_and_group_learning_rates():
    cos = opt.schedule_factor(ScheduleConfig(kind="cosine", warmup_steps=4, final_fraction=0.1), 14)
    assert [float(cos(s)) for s in (0, 3)] == [0.25, 1.0]
    assert float(cos(4)) == pytest.approx(1.0) and float(cos(14)) == pytest.approx(0.1)
    lin = opt.schedule_factor(ScheduleConfig(kind="linear", final_fraction=0.0), 10)
    assert float(lin(5)) == pytest.approx(0.5)
    assert float(opt.schedule_factor(ScheduleConfig(kind="constant"), 10)(9)) == 1.0
    peaks = opt.peak_learning_rates(["vision/a", "projector/kernel", "text/b"], 1e-5,
                                    [LrGroup("vision/.*", 2e-4), LrGroup("projector/.*", 2e-5)])
    assert peaks == {"vision/a": 2e-4, "projector/kernel": 2e-5, "text/b": 1e-5}


def test_train_cli_user_errors_are_one_line(capsys, tmp_path):
    from vlm_jax.cli import main
    assert main(["train", "--config", TINY, "train.steps=1"]) == 2
    assert main(["train", "--config", TINY, f"workdir={tmp_path}"]) == 2
    assert main(["train", "--config", TINY, f"workdir={tmp_path}", "train.steps=1", "train.microbatches=3",
                 "train.synthetic.enabled=true"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["vlm-jax train: error: workdir is not set; pass workdir=DIR (checkpoints and metrics go there)",
                   "vlm-jax train: error: train.steps must be positive (or give train.stages); e.g. train.steps=100",
                   "vlm-jax train: error: train.microbatches (3) must divide train.batch_size (8)"]


@pytest.mark.parametrize("clip_norm", [1.0, 100.0, 0.0])  # clipping, clipping on but not reached, no clipping
def test_optimizer_update_equals_optax_chain_and_its_guard_keeps_the_state(clip_norm):
    cfg = OptimizerConfig(clip_norm=clip_norm)
    rng = np.random.default_rng(0)
    shapes = {"text/decoder/layer_1/mlp/gate_proj/kernel": (2, 8, 16), "text/norm/scale": (8,)}
    params = {p: jnp.asarray(rng.normal(size=s), jnp.float32) for p, s in shapes.items()}
    grads = {p: jnp.asarray(rng.normal(size=s), jnp.float32) for p, s in shapes.items()}
    decay = {p: not opt.full_match(p, cfg.no_decay) for p in params}
    chain = ([optax.clip_by_global_norm(clip_norm)] if clip_norm else []) + [
        optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps), optax.add_decayed_weights(cfg.weight_decay, decay)]
    reference, tx = optax.chain(*chain), opt.build_optimizer(cfg, frozenset(params))
    state = ref_state = tx.init(params)
    for _ in range(2):  # the second step starts from non-zero moments
        ref_directions, ref_state = jax.jit(reference.update)(grads, ref_state, params)
        directions, state = jax.jit(tx.update)(grads, state, params)
        jax.tree.map(np.testing.assert_array_equal, (directions, state), (ref_directions, ref_state))
    _, kept = jax.jit(tx.update)(jax.tree.map(lambda g: g * jnp.nan, grads), state, params, finite=jnp.bool_(False))
    jax.tree.map(np.testing.assert_array_equal, kept, state)
