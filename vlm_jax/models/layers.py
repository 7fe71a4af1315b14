"""Shared building blocks: norms, RoPE (llama3 scaling), attention (GQA, masks, KV cache), MLPs, scanning.

Parameters and large activations carry logical axis names only; `vlm_jax.sharding` maps them to the mesh.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from vlm_jax.config import RopeScaling
from vlm_jax.models.attention import CausalSegments, kernel_for

Axes = tuple[str | None, ...]
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
default_kernel_init = nn.initializers.normal(stddev=0.02)


def dtype_of(name: str):
    return DTYPES[name]


def constrain(x, axes: Axes):
    return nn.with_logical_constraint(x, axes)


def param(module: nn.Module, name: str, init, shape, axes: Axes, dtype):
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


# The name every `dense` output carries, so the "dots" remat policies can save it (a custom_vjp call is not a
# dot_general to `checkpoint_dots`).
DENSE_OUTPUT = "dense"


def dense(x, kernel, n: int = 1):
    """x's last `n` dims contracted with kernel's first `n`: (..., *in) x (*in, *out) -> (..., *out)."""
    return checkpoint_name(_dense(x, kernel, n), DENSE_OUTPUT)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _dense(x, kernel, n):
    return jax.lax.dot_general(x, kernel, ((tuple(range(x.ndim - n, x.ndim)), tuple(range(n))), ((), ())))


def _dense_fwd(x, kernel, n):
    return _dense(x, kernel, n), (x, kernel)


def _dense_bwd(n, residuals, dy):
    """Each gradient is one dot_general whose result is already in its operand's dim order. From JAX's own
    transpose rule XLA:CPU made the kernel's gradient a matmul of a transposed `dy`, written by strided copies
    fused into dy's producer: 9-11% of an mllama_100m CPU train step (benchmarks/train_vs_pytorch.py)."""
    x, kernel = residuals
    lead = x.ndim - n
    dx = jax.lax.dot_general(dy, kernel, ((tuple(range(lead, dy.ndim)), tuple(range(n, kernel.ndim))), ((), ())))
    dkernel = jax.lax.dot_general(x, dy, ((tuple(range(lead)), tuple(range(lead))), ((), ())))
    return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


_dense.defvjp(_dense_fwd, _dense_bwd)


class Linear(nn.Module):
    """Dense layer contracting the last `contract_dims` input dims, with logically named kernel axes."""
    features: int | Sequence[int]
    kernel_axes: Axes
    use_bias: bool = False
    contract_dims: int = 1
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    kernel_init: Callable = default_kernel_init

    @nn.compact
    def __call__(self, x):
        features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
        n = self.contract_dims
        in_shape = x.shape[-n:]
        kernel = param(self, "kernel", self.kernel_init, (*in_shape, *features), self.kernel_axes, self.param_dtype)
        y = dense(x.astype(self.dtype), kernel.astype(self.dtype), n)
        if self.use_bias:
            bias = param(self, "bias", nn.initializers.zeros, features, self.kernel_axes[n:], self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


class RMSNorm(nn.Module):
    """w * (x * rsqrt(mean(x^2) + eps)) with the statistics in fp32, cast back before the weight."""
    axis_name: str
    eps: float = 1e-5
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = param(self, "scale", nn.initializers.ones, (x.shape[-1],), (self.axis_name,), self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * y.astype(self.dtype)


class LayerNorm(nn.Module):
    axis_name: str
    eps: float = 1e-5
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = param(self, "scale", nn.initializers.ones, (x.shape[-1],), (self.axis_name,), self.param_dtype)
        bias = param(self, "bias", nn.initializers.zeros, (x.shape[-1],), (self.axis_name,), self.param_dtype)
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * scale + bias).astype(self.dtype)


# --------------------------------------------------------------------------------------------- RoPE


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None):
    """Inverse frequencies, with Llama 3's piecewise wavelength scaling when configured."""
    inv = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if scaling is None or scaling.rope_type == "default":
        return inv
    orig = scaling.original_max_position_embeddings
    low_wavelen = orig / scaling.low_freq_factor
    high_wavelen = orig / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv
    smooth = (orig / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * inv / scaling.factor + smooth * inv
    scaled = jnp.where(wavelen > low_wavelen, inv / scaling.factor, inv)
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(is_medium, smoothed, scaled)


def apply_rope(x, positions, inv_freq):
    """Rotate-half RoPE. x: (B, S, H, D); positions: (B, S)."""
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # (B, S, D/2)
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


# ---------------------------------------------------------------------------------------- attention


@jax.custom_vjp
def masked_softmax(scores, mask):
    """Softmax over the last axis where `mask` allows (True = attend, broadcastable; None: everywhere); a row with
    no allowed key attends to nothing (all zeros) rather than uniformly to everything.

    Its backward is softmax's own, p * (g - sum(p * g)), from the probabilities alone. Autodiff through exp, sum
    and divide (what jax.nn.softmax differentiates while jax_softmax_custom_jvp is off, its default) costs XLA
    more passes over the (Sq, Sk) matrices and, on CPU, full-size broadcasts: attention's forward + backward
    1.4-1.8x slower, the mllama_100m CPU step ~6% (README, "The CPU step against PyTorch")."""
    return _masked_softmax_fwd(scores, mask)[0]


def _masked_softmax_fwd(scores, mask):
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
    unnormalized = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
    probs = unnormalized / jnp.sum(unnormalized, axis=-1, keepdims=True)
    if mask is not None:
        probs = probs * jnp.any(mask, axis=-1, keepdims=True)
    return probs, probs


def _masked_softmax_bwd(probs, g):
    return probs * (g - jnp.sum(probs * g, axis=-1, keepdims=True)), None


masked_softmax.defvjp(_masked_softmax_fwd, _masked_softmax_bwd)


def dot_product_attention(q, k, v, mask, *, impl: str = "xla"):
    """Grouped-query attention. q: (B, Sq, Hq, D); k, v: (B, Sk, Hkv, D); mask: a `CausalSegments`
    description, a bool array broadcastable to (B, 1, Sq, Sk) (True = attend), or None. Softmax in fp32.
    A kernel `impl` runs only for `CausalSegments` (see vlm_jax/models/attention.py); the rest is XLA's."""
    if isinstance(mask, CausalSegments):
        kernel = kernel_for(impl)
        if kernel is not None:
            return kernel(q, k, v, mask)
        mask = mask.dense()
    # Heads lead, (B, Hkv, R * Sq, D): each kv head's R query heads stacked along the rows, so the products are
    # plain batched matmuls and XLA:CPU copies no (Sq, Sk) matrix transposed for the backward's, 1.2-1.9x
    # faster than grouping the query heads inside the einsums (benchmarks/attention.py). Repeating the kv heads
    # instead was as fast on CPU but held 4x the keys and values: 22.35 GiB per chip in the 11B v5p-64 plan against
    # 21.78 for this form (both before masked_softmax, with which this form plans at 20.27).
    b, sq, hq, d = q.shape
    hkv = k.shape[2]
    group = hq // hkv
    q = q.reshape(b, sq, hkv, group, d).transpose(0, 2, 3, 1, 4).reshape(b, hkv, group * sq, d)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    scores = jnp.einsum("bgmd,bgkd->bgmk", q, k, preferred_element_type=jnp.float32) * (d ** -0.5)
    by_head = lambda x: x.reshape(b, hkv, group, sq, -1)  # noqa: E731  (the rows as (R, Sq), for the mask)
    probs = masked_softmax(by_head(scores), None if mask is None else mask[:, :, None]).reshape(scores.shape)
    out = jnp.einsum("bgmk,bgkd->bgmd", probs.astype(v.dtype), v)
    return by_head(out).transpose(0, 3, 1, 2, 4).reshape(b, sq, hq, d)


class KVCache(nn.Module):
    """Decode-time cache of keys/values (B, max_len, Hkv, D) and the segment id of each cached slot.

    The first call (prefill) sizes the cache from its input; later calls append one chunk at `index`.
    """
    @nn.compact
    def __call__(self, k, v, segment_ids, positions):
        initialised = self.has_variable("cache", "key")
        key = self.variable("cache", "key", jnp.zeros, k.shape, k.dtype)
        value = self.variable("cache", "value", jnp.zeros, v.shape, v.dtype)
        seg = self.variable("cache", "segment_ids", jnp.zeros, segment_ids.shape, jnp.int32)
        pos = self.variable("cache", "positions", jnp.zeros, positions.shape, jnp.int32)
        index = self.variable("cache", "index", lambda: jnp.array(0, jnp.int32))
        if not initialised:  # init pass only allocates
            return k, v, segment_ids, positions
        i = index.value
        key.value = jax.lax.dynamic_update_slice_in_dim(key.value, k, i, axis=1)
        value.value = jax.lax.dynamic_update_slice_in_dim(value.value, v, i, axis=1)
        seg.value = jax.lax.dynamic_update_slice_in_dim(seg.value, segment_ids.astype(jnp.int32), i, axis=1)
        pos.value = jax.lax.dynamic_update_slice_in_dim(pos.value, positions.astype(jnp.int32), i, axis=1)
        index.value = i + k.shape[1]
        return key.value, value.value, seg.value, pos.value


class Attention(nn.Module):
    """Multi-head / grouped-query attention with optional RoPE, q/k RMS norms and a decode-time cache."""
    embed_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    embed_axis: str
    heads_axis: str
    kv_heads_axis: str
    use_bias: bool = False
    qk_norm_eps: float | None = None  # RMS norm over head_dim on q and k (Mllama cross-attention)
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    attention_impl: str = "xla"
    batch_axis: str = "batch"
    length_axis: str = "length"

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=self.use_bias)
        self.q_proj = Linear((self.num_heads, self.head_dim), (self.embed_axis, self.heads_axis, "head_dim"), **kw)
        self.k_proj = Linear((self.num_kv_heads, self.head_dim), (self.embed_axis, self.kv_heads_axis, "head_dim"), **kw)
        self.v_proj = Linear((self.num_kv_heads, self.head_dim), (self.embed_axis, self.kv_heads_axis, "head_dim"), **kw)
        self.o_proj = Linear(self.embed_dim, (self.heads_axis, "head_dim", self.embed_axis),
                             contract_dims=2, **kw)
        if self.qk_norm_eps is not None:
            self.q_norm = RMSNorm("head_dim", self.qk_norm_eps, self.dtype, self.param_dtype)
            self.k_norm = RMSNorm("head_dim", self.qk_norm_eps, self.dtype, self.param_dtype)

    def project_q(self, x):
        q = self.q_proj(x)
        return self.q_norm(q) if self.qk_norm_eps is not None else q

    def project_kv(self, x):
        k = self.k_proj(x)
        k = self.k_norm(k) if self.qk_norm_eps is not None else k
        return k, self.v_proj(x)

    def attend(self, q, k, v, mask):
        q = constrain(q, (self.batch_axis, self.length_axis, "act_heads", None))
        out = dot_product_attention(q, k, v, mask, impl=self.attention_impl)
        return self.o_proj(out)

    def __call__(self, x, mask):
        """Self-attention without RoPE (vision towers)."""
        k, v = self.project_kv(x)
        return self.attend(self.project_q(x), k, v, mask)


class SwiGLU(nn.Module):
    hidden: int
    embed_axis: str = "embed"
    mlp_axis: str = "mlp"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        gate = Linear(self.hidden, (self.embed_axis, self.mlp_axis), name="gate_proj", **kw)(x)
        up = Linear(self.hidden, (self.embed_axis, self.mlp_axis), name="up_proj", **kw)(x)
        h = constrain(nn.silu(gate) * up, ("batch", "length", "act_mlp"))
        return Linear(x.shape[-1], (self.mlp_axis, self.embed_axis), name="down_proj", **kw)(h)


ACTIVATIONS = {  # HF `hidden_act` names
    # Exact gelu in PyTorch's form, x/2 (1 + erf(x/sqrt 2)): flax's erfc form costs XLA:CPU about twice as much.
    "gelu": lambda x: 0.5 * x * (1 + jax.lax.erf(x * (2 ** -0.5))),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


class GeluMLP(nn.Module):
    """fc2(act(fc1(x))): ViT MLPs and the LLaVA projector (which changes width: `out_features`)."""
    hidden: int
    embed_axis: str = "vision_embed"
    mlp_axis: str = "vision_mlp"
    activation: str = "gelu"  # exact erf gelu (Mllama); see ACTIVATIONS
    out_features: int | None = None  # default: the input width
    out_axis: str | None = None  # default: embed_axis
    use_bias: bool = True
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=self.use_bias)
        h = Linear(self.hidden, (self.embed_axis, self.mlp_axis), name="fc1", **kw)(x)
        h = ACTIVATIONS[self.activation](h)
        out_axis = self.out_axis or self.embed_axis
        return Linear(self.out_features or x.shape[-1], (self.mlp_axis, out_axis), name="fc2", **kw)(h)


@dataclasses.dataclass(frozen=True)
class EncoderSpec:
    """Sizes, numerics and logical axis names of one pre-norm transformer encoder stack (a ViT, or a
    contrastive text tower with the text axes)."""
    hidden_size: int
    num_heads: int
    intermediate_size: int
    norm_eps: float
    activation: str = "gelu"
    attention_bias: bool = False
    embed_axis: str = "vision_embed"
    heads_axis: str = "vision_heads"
    mlp_axis: str = "vision_mlp"
    length_axis: str = "vision_length"
    layers_axis: str = "vision_layers"
    batch_axis: str = "vision_batch"


class EncoderLayer(nn.Module):
    """x += attn(LN1(x)); x += mlp(LN2(x)). `gated` adds tanh gates on both residual branches (Mllama global
    layers). `emit` picks the per-layer output of a scan: the layer's "output", its "input", or "none"."""
    spec: EncoderSpec
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    attention_impl: str = "xla"
    gated: bool = False
    emit: str = "none"

    @nn.compact
    def __call__(self, x, mask):
        sp, kw = self.spec, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        inputs = x
        attention = Attention(sp.hidden_size, sp.num_heads, sp.num_heads, sp.hidden_size // sp.num_heads,
                              sp.embed_axis, sp.heads_axis, sp.heads_axis, use_bias=sp.attention_bias,
                              attention_impl=self.attention_impl, batch_axis=sp.batch_axis,
                              length_axis=sp.length_axis, name="self_attn", **kw)
        h = attention(LayerNorm(sp.embed_axis, sp.norm_eps, name="input_layernorm", **kw)(x), mask)
        if self.gated:
            h = jnp.tanh(param(self, "gate_attn", nn.initializers.zeros, (1,), (None,), self.param_dtype)).astype(h.dtype) * h
        x = x + h
        h = GeluMLP(sp.intermediate_size, sp.embed_axis, sp.mlp_axis, sp.activation, name="mlp", **kw)(
            LayerNorm(sp.embed_axis, sp.norm_eps, name="post_attention_layernorm", **kw)(x))
        if self.gated:
            h = jnp.tanh(param(self, "gate_ffn", nn.initializers.zeros, (1,), (None,), self.param_dtype)).astype(h.dtype) * h
        x = constrain(x + h, (sp.batch_axis, sp.length_axis, "act_embed"))
        return x, {"input": inputs, "output": x, "none": None}[self.emit]


# -------------------------------------------------------------------------------------------- depth

_saves_dense = jax.checkpoint_policies.save_only_these_names(DENSE_OUTPUT)
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.save_from_both_policies(jax.checkpoint_policies.checkpoint_dots, _saves_dense),
    "dots_no_batch": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims, _saves_dense),
}


def stack_layers(block_cls, *, length: int, layers_axis: str, remat_policy: str, scan: bool,
                 static_argnums: tuple[int, ...] = ()):
    """Returns a function building `length` repetitions of `block_cls` applied in sequence.

    With `scan`, parameters are stacked on a leading axis named `layers_axis` and the body is traced once,
    so compile time does not grow with depth. A block is `(carry, *broadcast) -> (carry, per_layer_output)`.
    """
    if remat_policy != "none":
        block_cls = nn.remat(block_cls, policy=REMAT_POLICIES[remat_policy], prevent_cse=not scan,
                             static_argnums=static_argnums)

    def build(name: str, **block_kwargs):
        if scan:
            scanned = nn.scan(block_cls, variable_axes={"params": 0, "cache": 0}, split_rngs={"params": True},
                              in_axes=nn.broadcast, length=length,
                              metadata_params={nn.PARTITION_NAME: layers_axis})
            return scanned(name=name, **block_kwargs)
        return _Unrolled(block_cls, length, block_kwargs, name=name)

    return build


class _Unrolled(nn.Module):
    """The unscanned twin of nn.scan: blocks `layers_0..layers_{n-1}`, outputs stacked like scan's."""
    block_cls: type
    length: int
    block_kwargs: dict

    @nn.compact
    def __call__(self, carry, *args):
        outputs = []
        for i in range(self.length):
            carry, out = self.block_cls(name=f"layers_{i}", **self.block_kwargs)(carry, *args)
            outputs.append(out)
        stacked = None if outputs[0] is None else jax.tree.map(lambda *xs: jnp.stack(xs), *outputs)
        return carry, stacked
