"""Llama decoder with gated cross-attention layers at configured indices (Mllama, hf_layouts.md A3).

Self- and cross-attention layers share one index space. When the indices are evenly spaced the stack is
`num_layers / period` identical blocks of `period` layers, scanned, so compile time does not grow with depth.
"""
from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax.numpy as jnp

from vlm_jax.config import ModelConfig
from vlm_jax.models.attention import CausalSegments
from vlm_jax.models.layers import (Attention, KVCache, Linear, RMSNorm, SwiGLU, apply_rope, constrain, dtype_of,
                                   param, rope_inv_freq, stack_layers)


class DecoderInputs(NamedTuple):
    """What every layer of the stack sees besides the residual stream (broadcast through the scan)."""
    positions: jnp.ndarray  # (B, S)
    segment_ids: jnp.ndarray  # (B, S); 0 = padding
    cross_states: jnp.ndarray | None  # (B, K, H) projected vision tokens, or None (text-only / cached)
    cross_mask: jnp.ndarray | None  # (B, 1, S, K) bool, True = attend
    cross_row_mask: jnp.ndarray | None  # (B, S, 1): 0 on rows that may see no image


def packing_defaults(input_ids, segment_ids=None, positions=None):
    """One causal segment per row unless packed rows say otherwise (segment 0 = padding)."""
    b, s = input_ids.shape
    if segment_ids is None:
        segment_ids = jnp.ones((b, s), jnp.int32)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    return jnp.asarray(segment_ids), jnp.asarray(positions)


def _kw(cfg: ModelConfig):
    return dict(dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype))


def _attention(cfg: ModelConfig, name: str, cross: bool):
    t = cfg.text
    heads = ("xattn_heads", "xattn_kv_heads") if cross else ("heads", "kv_heads")
    return Attention(t.hidden_size, t.num_heads, t.num_kv_heads, t.head_dim, "embed", *heads,
                     qk_norm_eps=t.rms_norm_eps if cross else None, attention_impl=cfg.attention_impl,
                     name=name, **_kw(cfg))


class SelfAttentionLayer(nn.Module):
    config: ModelConfig
    decode: bool = False

    @nn.compact
    def __call__(self, x, inputs: DecoderInputs):
        t = self.config.text
        attn = _attention(self.config, "self_attn", cross=False)
        h = RMSNorm("embed", t.rms_norm_eps, name="input_layernorm", **_kw(self.config))(x)
        inv_freq = rope_inv_freq(t.head_dim, t.rope_theta, t.rope_scaling)
        q = apply_rope(attn.project_q(h), inputs.positions, inv_freq)
        k, v = attn.project_kv(h)
        k = apply_rope(k, inputs.positions, inv_freq)
        mask = CausalSegments(inputs.segment_ids, inputs.positions)
        if self.decode:  # queries see the cache's keys: a dense mask, so the XLA path
            k, v, k_segments, k_positions = KVCache(name="cache")(k, v, inputs.segment_ids, inputs.positions)
            mask = mask.dense_against(k_segments, k_positions)
        x = x + attn.attend(q, k, v, mask)
        h = RMSNorm("embed", t.rms_norm_eps, name="post_attention_layernorm", **_kw(self.config))(x)
        return x + SwiGLU(t.intermediate_size, name="mlp", **_kw(self.config))(h)


class CrossAttentionLayer(nn.Module):
    """Gated cross-attention to vision tokens: q/k RMS norms, no RoPE, tanh gates, MLP rows masked where a
    token may see no image. Skipped when there are no vision states (text-only input)."""
    config: ModelConfig
    decode: bool = False

    @nn.compact
    def __call__(self, x, inputs: DecoderInputs):
        t, kw = self.config.text, _kw(self.config)
        attn = _attention(self.config, "cross_attn", cross=True)
        gate_init = nn.initializers.constant(t.cross_attention_gate_init)
        attn_gate = param(self, "attn_gate", gate_init, (1,), (None,), kw["param_dtype"])
        mlp_gate = param(self, "mlp_gate", gate_init, (1,), (None,), kw["param_dtype"])
        input_norm = RMSNorm("embed", t.rms_norm_eps, name="input_layernorm", **kw)
        post_norm = RMSNorm("embed", t.rms_norm_eps, name="post_attention_layernorm", **kw)
        mlp = SwiGLU(t.intermediate_size, name="mlp", **kw)
        cached = self.decode and self.has_variable("cache", "cross_key")
        if inputs.cross_states is None and not cached:
            if self.is_initializing():  # create the parameters even when initialised text-only
                attn(input_norm(x), None), mlp(post_norm(x))
            return x
        q = attn.project_q(input_norm(x))
        if inputs.cross_states is not None:
            k, v = attn.project_kv(inputs.cross_states)
            if self.decode:
                self.variable("cache", "cross_key", lambda: k).value = k
                self.variable("cache", "cross_value", lambda: v).value = v
        else:
            k, v = self.get_variable("cache", "cross_key"), self.get_variable("cache", "cross_value")
        h = attn.attend(q, k, v, inputs.cross_mask)
        x = x + jnp.tanh(attn_gate).astype(h.dtype) * h
        h = mlp(post_norm(x))
        if inputs.cross_row_mask is not None:
            h = h * inputs.cross_row_mask.astype(h.dtype)
        return x + jnp.tanh(mlp_gate).astype(h.dtype) * h


class DecoderBlock(nn.Module):
    """Layers `layer_0..layer_{n-1}`; `cross` lists which of them are cross-attention layers."""
    config: ModelConfig
    num_layers: int
    cross: tuple[int, ...]
    decode: bool = False

    @nn.compact
    def __call__(self, x, inputs: DecoderInputs):
        for j in range(self.num_layers):
            layer_cls = CrossAttentionLayer if j in self.cross else SelfAttentionLayer
            x = layer_cls(self.config, self.decode, name=f"layer_{j}")(x, inputs)
            x = constrain(x, ("batch", "length", "act_embed"))
        return x, None


def layer_layout(cfg: ModelConfig) -> tuple[int, int, tuple[int, ...]]:
    """(repeats, layers per block, cross-attention positions within a block) of the text stack."""
    t = cfg.text
    if not cfg.scan_layers:
        return 1, t.num_layers, tuple(t.cross_attention_layers)
    period = t.scan_period
    offsets = tuple(sorted({i % period for i in t.cross_attention_layers}))
    return t.num_layers // period, period, offsets


class TextDecoder(nn.Module):
    config: ModelConfig
    decode: bool = False

    @nn.compact
    def __call__(self, input_ids, inputs: DecoderInputs, return_hidden: bool = False, override_embeds=None,
                 override_mask=None):
        """`override_embeds` (B, S, H) replace the token embeddings where `override_mask` (B, S) is True
        (image features at `<image>` positions in the unified families)."""
        cfg, t = self.config, self.config.text
        kw = _kw(cfg)
        embed = nn.Embed(t.vocab_size + t.extra_embeddings, t.hidden_size, dtype=kw["dtype"], param_dtype=kw["param_dtype"],
                         embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                     ("vocab", "embed")),
                         name="embed_tokens")
        x = embed(input_ids)
        if override_embeds is not None:
            x = jnp.where(override_mask[..., None], override_embeds.astype(x.dtype), x)
        x = constrain(x, ("batch", "length", "act_embed"))
        repeats, period, cross = layer_layout(cfg)
        block = dict(config=cfg, num_layers=period, cross=cross, decode=self.decode)
        if repeats == 1:
            x, _ = DecoderBlock(name="decoder", **block)(x, inputs)
        else:
            stack = stack_layers(DecoderBlock, length=repeats, layers_axis="layers",
                                 remat_policy=cfg.remat_policy, scan=True)
            x, _ = stack("decoder", **block)(x, inputs)
        x = RMSNorm("embed", t.rms_norm_eps, name="norm", **kw)(x)
        if cfg.reward_head and self.is_initializing():
            # Zero-initialised, so a fresh head (also one added to an SFT checkpoint) scores every answer 0.
            # The reward objective applies it to one hidden state per row (`reward_scores`), not here.
            Linear(1, ("embed", None), use_bias=True, kernel_init=nn.initializers.zeros, name="reward_head",
                   **kw)(x[:, :1])
        if return_hidden:
            return x
        if t.tie_word_embeddings:
            logits = embed.attend(x)[..., :t.vocab_size]
        else:
            logits = Linear(t.vocab_size, ("embed", "vocab"), name="lm_head", **kw)(x)
        return constrain(logits.astype(jnp.float32), ("batch", "length", "act_vocab"))
