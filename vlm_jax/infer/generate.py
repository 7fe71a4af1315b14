"""Jitted prefill + decode with a KV cache; cross-attention keys/values are computed once per image.

Prompts are LEFT-padded to one length (`prompt_mask` marks real tokens), so every row's next token lands in
the same cache slot; padding is its own segment (0) and never attended to.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = no top-k cut
    top_p: float = 1.0  # 1 = no nucleus cut
    max_new_tokens: int = 32
    stop_tokens: tuple[int, ...] = ()
    pad_token: int = 0


def sample_logits(logits, rng, s: Sampling):
    """Next token (B,) from fp32 logits (B, V): greedy, or temperature with optional top-k / top-p cuts."""
    if s.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / s.temperature
    neg = jnp.finfo(logits.dtype).min
    if s.top_k > 0:
        kth = jax.lax.top_k(logits, s.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if s.top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always survives).
        cutoff_index = jnp.sum(cumulative < s.top_p, axis=-1, keepdims=True)
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_index, axis=-1)
        logits = jnp.where(logits < cutoff, neg, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _positions(prompt_mask):
    return jnp.maximum(jnp.cumsum(prompt_mask, axis=-1) - 1, 0).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _generate(decoder, params, inputs: dict, sampling: Sampling, rng):
    ids, prompt_mask = inputs["input_ids"], inputs["prompt_mask"].astype(jnp.int32)
    b, s = ids.shape
    total = s + sampling.max_new_tokens
    # The family's image inputs (Family.generation_inputs): everything but the text and its masks.
    vision = {k: v for k, v in inputs.items() if k not in ("input_ids", "prompt_mask", "cross_attention_mask")}
    cross_mask = inputs.get("cross_attention_mask")
    positions = _positions(prompt_mask)

    # The cache is sized for prompt + new tokens; shapes come from an abstract init, nothing is computed twice.
    shapes = jax.eval_shape(lambda: decoder.init(
        jax.random.PRNGKey(0), jnp.zeros((b, total), jnp.int32), **vision,
        cross_attention_mask=None if cross_mask is None else jnp.zeros((b, total) + cross_mask.shape[2:], jnp.int32),
        positions=jnp.zeros((b, total), jnp.int32))["cache"])
    cache = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)

    logits, state = decoder.apply({"params": params, "cache": cache}, ids, **vision, cross_attention_mask=cross_mask,
                                  segment_ids=prompt_mask, positions=positions, mutable=["cache"])
    step_cross = None if cross_mask is None else cross_mask[:, -1:]  # new tokens see what the last prompt token saw
    next_position = positions[:, -1:] + 1

    def body(carry):
        i, cache, last_logits, pos, done, out, rng = carry
        rng, key = jax.random.split(rng)
        token = sample_logits(last_logits, key, sampling)
        token = jnp.where(done, sampling.pad_token, token)
        out = out.at[:, i].set(token)
        done = done | jnp.isin(token, jnp.asarray(sampling.stop_tokens or (-1,), jnp.int32))
        logits, state = decoder.apply({"params": params, "cache": cache}, token[:, None],
                                      cross_attention_mask=step_cross, segment_ids=jnp.ones((b, 1), jnp.int32),
                                      positions=pos, mutable=["cache"])
        return i + 1, state["cache"], logits[:, -1], pos + 1, done, out, rng

    def cond(carry):
        i, done = carry[0], carry[4]
        return (i < sampling.max_new_tokens) & ~jnp.all(done)

    out = jnp.full((b, sampling.max_new_tokens), sampling.pad_token, jnp.int32)
    carry = (0, state["cache"], logits[:, -1], next_position, jnp.zeros((b,), bool), out, rng)
    return jax.lax.while_loop(cond, body, carry)[5]


def generate(model, params, inputs: dict, sampling: Sampling = Sampling(), rng=None):
    """New tokens (B, max_new_tokens), `pad_token` after a row's stop token.

    inputs: `input_ids` (B, S) left-padded, `prompt_mask` (B, S) 1 on real tokens (default all ones), and for
    images the model's vision inputs and `cross_attention_mask` (B, S, N, T)."""
    inputs = dict(inputs)
    inputs.setdefault("prompt_mask", jnp.ones_like(jnp.asarray(inputs["input_ids"])))
    inputs = {k: jnp.asarray(v) for k, v in inputs.items() if v is not None}
    rng = jax.random.PRNGKey(0) if rng is None else rng
    return _generate(model.clone(decode=True), params, inputs, sampling, rng)
