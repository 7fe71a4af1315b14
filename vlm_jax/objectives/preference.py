"""Direct preference optimisation (DPO, Rafailov et al. 2023), as Llama 3-V's post-training uses it.

A batch holds preference pairs in consecutive rows: row 2i the chosen answer, row 2i+1 the rejected one, with
the same prompt and images, so every model input keeps its SFT layout and a device holding an even number of
rows holds whole pairs. An answer's log-prob is the sum of log p over its supervised tokens (the answer and its
end-of-turn, as in SFT). With pi / ref the policy's / the frozen reference's log-probs and
margin = (pi_chosen - pi_rejected) - (ref_chosen - ref_rejected), the loss per pair is TRL's sigmoid loss

    -(1 - ls) * log_sigmoid(beta * margin) - ls * log_sigmoid(-beta * margin)     (ls: label smoothing)

plus `sft_weight` times the chosen answer's mean per-token NLL. Sums are over pairs (LossSums.weight = pairs),
so gradient accumulation stays exact; rows without supervised tokens (padding of a held-out batch) form no pair.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from vlm_jax.config import TrainConfig
from vlm_jax.objectives.base import REFERENCE_LOGPS, LossSums
from vlm_jax.objectives.next_token import row_sums
from vlm_jax.registry import OBJECTIVES


def answer_logps(model, params, inputs: dict, batch: dict, train: TrainConfig) -> jax.Array:
    """(B,) fp32: log p of each row's supervised tokens, summed (what the reference model contributes)."""
    return -row_sums(model, params, inputs, batch, train).nll


def dpo_terms(policy, reference, tokens, beta: float, label_smoothing: float, sft_weight: float) -> LossSums:
    """LossSums over pairs from per-row answer log-probs (B,) of the policy and reference and supervised token
    counts (B,), rows alternating chosen / rejected."""
    policy, reference, tokens = (x.reshape(-1, 2) for x in (policy, reference, tokens))
    valid = (tokens[:, 0] > 0).astype(jnp.float32)
    rewards = beta * (policy - reference)  # the implicit rewards of chosen and rejected
    logits = rewards[:, 0] - rewards[:, 1]  # beta * margin
    dpo = -(1 - label_smoothing) * jax.nn.log_sigmoid(logits) - label_smoothing * jax.nn.log_sigmoid(-logits)
    sft = -policy[:, 0] / jnp.maximum(tokens[:, 0], 1.0)
    per_pair = {"dpo_loss": dpo, "sft_nll": sft, "reward_accuracy": (logits > 0).astype(jnp.float32),
                "reward_margin": logits, "rewards_chosen": rewards[:, 0], "rewards_rejected": rewards[:, 1],
                "logps_chosen": policy[:, 0], "logps_rejected": policy[:, 1]}
    metrics = {k: jnp.sum(v * valid) for k, v in per_pair.items()}
    return LossSums(metrics["dpo_loss"] + sft_weight * metrics["sft_nll"], jnp.zeros((), jnp.float32),
                    jnp.sum(valid), metrics)


@OBJECTIVES.register("dpo")
def dpo_loss(model, params, inputs: dict, batch: dict, train: TrainConfig) -> LossSums:
    sums = row_sums(model, params, inputs, batch, train)
    d = train.dpo
    return dpo_terms(-sums.nll, batch[REFERENCE_LOGPS], sums.weight, d.beta, d.label_smoothing, d.sft_weight)


dpo_loss.paired = dpo_loss.uses_reference = True
