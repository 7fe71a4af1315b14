"""Next-token cross-entropy over supervised tokens, computed in sequence chunks from the final hidden states.

logits[:, s-1] predicts input_ids[:, s], weighted by loss_mask[:, s]. With several chunks, each chunk's
(B, chunk, V) logits exist only inside a rematerialised map body, so the full (tokens x vocab) logits are never
held at once, forward or backward; a sequence that fits one chunk keeps its logits for the backward pass
instead of computing them twice. All functions return SUMS over tokens; callers divide by the supervised-token
count, which keeps gradient accumulation exact (token-weighted, not microbatch-averaged).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from vlm_jax.config import ModelConfig, TrainConfig
from vlm_jax.models.layers import dense, dtype_of
from vlm_jax.objectives.base import LossSums
from vlm_jax.registry import OBJECTIVES


def next_token_targets(input_ids, loss_mask):
    """(targets, weights), both (B, S): position s is scored against token s+1; the last position is unused."""
    targets = jnp.concatenate([input_ids[:, 1:], jnp.zeros_like(input_ids[:, :1])], axis=1)
    weights = jnp.concatenate([loss_mask[:, 1:], jnp.zeros_like(loss_mask[:, :1])], axis=1)
    return targets.astype(jnp.int32), weights.astype(jnp.float32)


def _token_sums(logits, targets, weights) -> LossSums:
    """Per-row sums, each (B,)."""
    lse = jax.nn.logsumexp(logits, axis=-1)
    # Unsupervised targets may lie outside the vocabulary (the image token): clip them so the gather
    # cannot produce NaN, which a zero weight would not cancel.
    safe_targets = jnp.clip(targets, 0, logits.shape[-1] - 1)
    target_logit = jnp.take_along_axis(logits, safe_targets[..., None], axis=-1)[..., 0]
    return LossSums(jnp.sum((lse - target_logit) * weights, axis=-1), jnp.sum(lse ** 2 * weights, axis=-1),
                    jnp.sum(weights, axis=-1))


def _total(sums: LossSums) -> LossSums:
    return LossSums(jnp.sum(sums.nll), jnp.sum(sums.z), jnp.sum(sums.weight))


def full_logits_loss(logits, targets, weights) -> LossSums:
    """Reference: the same sums from materialised (B, S, V) fp32 logits."""
    return _total(_token_sums(logits.astype(jnp.float32), targets, weights))


def lm_head_kernel(params, config: ModelConfig):
    """(H, V) output projection, also when tied to the input embedding."""
    text = params["text"]
    if config.text.tie_word_embeddings:
        return text["embed_tokens"]["embedding"][:config.text.vocab_size].T
    return text["lm_head"]["kernel"]


def chunked_loss(hidden, kernel, targets, weights, chunk: int, compute_dtype) -> LossSums:
    """hidden (B, S, H) -> LossSums without materialising more than (B, chunk, V) logits."""
    return _total(chunked_row_sums(hidden, kernel, targets, weights, chunk, compute_dtype))


def chunked_row_sums(hidden, kernel, targets, weights, chunk: int, compute_dtype) -> LossSums:
    """`chunked_loss` per row: LossSums of (B,) arrays (sequence-level scores, e.g. preference log-probs)."""
    b, s, h = hidden.shape
    chunk = min(chunk, s)
    pad = -s % chunk
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets, weights = (jnp.pad(x, ((0, 0), (0, pad))) for x in (targets, weights))
    n = (s + pad) // chunk

    def chunks(x):  # (B, n*chunk, ...) -> (n, B, chunk, ...)
        return jnp.moveaxis(x.reshape(b, n, chunk, *x.shape[2:]), 1, 0)

    def one_chunk(args):
        h_c, t_c, w_c = args
        # Same arithmetic as the model's lm_head (compute dtype, then fp32), so both losses agree.
        logits = dense(h_c.astype(compute_dtype), kernel.astype(compute_dtype))
        return _token_sums(logits.astype(jnp.float32), t_c, w_c)

    if n == 1:  # holding one chunk's logits for the backward pass costs no more memory than recomputing them
        return one_chunk((hidden, targets, weights))
    per_chunk = jax.lax.map(jax.checkpoint(one_chunk), (chunks(hidden), chunks(targets), chunks(weights)))
    return LossSums(*(jnp.sum(x, axis=0) for x in per_chunk[:3]))


def row_sums(model, params, inputs: dict, batch: dict, train: TrainConfig) -> LossSums:
    """Per row (B,): -log p of the supervised tokens of `batch` (its input_ids and loss_mask), summed."""
    hidden = model.apply({"params": params}, **inputs, return_hidden=True)
    targets, weights = next_token_targets(batch["input_ids"], batch["loss_mask"])
    kernel = lm_head_kernel(params, model.config)
    return chunked_row_sums(hidden, kernel, targets, weights, train.loss_chunk, dtype_of(model.config.dtype))


@OBJECTIVES.register("next_token")
def next_token_loss(model, params, inputs: dict, batch: dict, train: TrainConfig) -> LossSums:
    """Language modelling on the supervised tokens of `batch` (its input_ids and loss_mask)."""
    return _total(row_sums(model, params, inputs, batch, train))
