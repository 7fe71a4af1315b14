"""Reward-model training (Llama 3-V's reward model): the VLM with a scalar head (`model.reward_head`) read at the
last supervised token of each answer, trained with the Bradley-Terry loss on preference pairs.

Batches are DPO's (rows 2i / 2i+1 the chosen / rejected answer; see preference.py) without a reference model. An
answer's score s is the head applied to the final hidden state at its last supervised token (the end of turn
that closes the answer: it has seen the prompt, the images and the whole answer; rows are right-padded). Per pair

    -log_sigmoid(s_chosen - s_rejected) + drift_weight * ((s_chosen + s_rejected) / 2)^2

the second term keeping the scores centred (Bradley-Terry alone is blind to a shift of all scores). Sums are
over pairs; rows without supervised tokens (padding of a held-out batch) form no pair.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from vlm_jax.config import TrainConfig
from vlm_jax.errors import ConfigError
from vlm_jax.objectives.base import LossSums
from vlm_jax.registry import OBJECTIVES

REWARD_HEAD = "reward_head"  # under params["text"]: kernel (H, 1), bias (1,)


def last_supervised(loss_mask) -> jax.Array:
    """(B,) int32: the index of each row's last supervised position (0 for a row with none)."""
    mask = jnp.asarray(loss_mask) > 0
    last = mask.shape[1] - 1 - jnp.argmax(mask[:, ::-1], axis=1)
    return jnp.where(mask.any(axis=1), last, 0).astype(jnp.int32)


def reward_scores(model, params, inputs: dict, loss_mask) -> jax.Array:
    """(B,) fp32: the reward head on each row's final hidden state at its last supervised token."""
    if REWARD_HEAD not in params.get("text", {}):
        raise ConfigError("the reward objective and `vlm-jax score` need a reward head; set model.reward_head=true "
                          "(and train it with train.objective=reward)")
    hidden = model.apply({"params": params}, **inputs, return_hidden=True)
    at_last = jnp.take_along_axis(hidden, last_supervised(loss_mask)[:, None, None], axis=1)[:, 0]
    head = params["text"][REWARD_HEAD]
    # fp32: one dot product per row, so precision costs nothing here.
    return (at_last.astype(jnp.float32) @ head["kernel"].astype(jnp.float32))[:, 0] + head["bias"][0]


def reward_terms(scores, supervised, drift_weight: float) -> LossSums:
    """LossSums over pairs from per-row scores (B,) and supervised token counts (B,), rows alternating chosen /
    rejected. reward_accuracy counts a tie as half a correct pair (a coin flip), so a blind model is at 0.5."""
    scores, supervised = scores.reshape(-1, 2), supervised.reshape(-1, 2)
    valid = (supervised[:, 0] > 0).astype(jnp.float32)
    margin = scores[:, 0] - scores[:, 1]
    mean = 0.5 * (scores[:, 0] + scores[:, 1])
    per_pair = {"bt_loss": -jax.nn.log_sigmoid(margin), "score_drift": mean ** 2,
                "reward_accuracy": (margin > 0) + 0.5 * (margin == 0), "score_margin": margin, "score_mean": mean}
    metrics = {k: jnp.sum(v.astype(jnp.float32) * valid) for k, v in per_pair.items()}
    return LossSums(metrics["bt_loss"] + drift_weight * metrics["score_drift"], jnp.zeros((), jnp.float32),
                    jnp.sum(valid), metrics)


@OBJECTIVES.register("reward")
def reward_loss(model, params, inputs: dict, batch: dict, train: TrainConfig) -> LossSums:
    scores = reward_scores(model, params, inputs, batch["loss_mask"])
    return reward_terms(scores, jnp.sum(batch["loss_mask"], axis=1), train.reward.drift_weight)


reward_loss.paired = True
