"""Attention kernels from maintained libraries: JAX's Pallas TPU splash attention and cuDNN flash attention.

Which attention a kernel runs (the rule `model.attention_impl` documents): the decoder's causal
self-attention over a whole sequence (training, eval), described by `CausalSegments` rather than a dense mask
so the kernel can take the segment ids itself. Cross-attention, the vision towers and cached decoding pass
dense masks (or none) and always run the XLA einsum path in `layers.dot_product_attention`.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

from vlm_jax.errors import ConfigError

KERNEL_PLATFORM = {"splash": "tpu", "cudnn": "gpu"}
# The kernel's sequence blocks: splash needs multiples of 128 (TPU lanes); 512 is its tuned default.
LANES, MAX_BLOCK = 128, 512


class CausalSegments(NamedTuple):
    """Mask description of packed causal self-attention: a query sees the keys of its own segment (0 =
    padding) at positions not after its own. Kernels read it as "causal by index within segment", which is
    the same mask when positions count up by one inside each segment, as packing and `packing_defaults` make."""
    segment_ids: jnp.ndarray  # (B, S)
    positions: jnp.ndarray  # (B, S)

    def dense(self):
        """(B, 1, S, S) bool, True = attend: what the XLA path applies."""
        return self.dense_against(self.segment_ids, self.positions)

    def dense_against(self, k_segments, k_positions):
        """(B, 1, S, Sk) bool for these queries over other keys (a decode step over its KV cache)."""
        same = self.segment_ids[:, :, None] == k_segments[:, None, :]
        causal = k_positions[:, None, :] <= self.positions[:, :, None]
        return (same & causal)[:, None]


def resolved_model(m, platform: str, packed: bool, echo):
    """`m` (a ModelConfig) with its attention impl chosen for `platform`, the choice echoed unless plain xla."""
    impl, why = choose_attention_impl(m.attention_impl, platform, packed)
    if m.attention_impl != "xla":
        echo(f"attention: {why}")
    return dataclasses.replace(m, attention_impl=impl)


def choose_attention_impl(requested: str, platform: str, packed: bool) -> tuple[str, str]:
    """(the impl to run, why) for `model.attention_impl` on `platform` ("tpu", "gpu", "cpu"); `packed` says
    whether training rows carry several segments. Refuses a kernel its platform cannot run (one line)."""
    if requested == "auto":
        if platform == "tpu":
            return "splash", "auto: splash on tpu (Pallas splash attention, packed segment ids)"
        if platform == "gpu" and packed:
            return "xla", ("auto: xla on gpu because data.packing.enabled and cuDNN attention in this JAX takes "
                           "no segment ids")
        if platform == "gpu":
            return "cudnn", "auto: cudnn on gpu (cuDNN flash attention, causal)"
        return "xla", f"auto: xla on {platform} (no attention kernel for this platform)"
    want = KERNEL_PLATFORM.get(requested)
    if want and platform != want:
        raise ConfigError(f"model.attention_impl: '{requested}' runs on {want}, not on {platform}; use "
                          f"model.attention_impl=auto (picks per platform) or xla")
    if requested == "cudnn" and packed:
        raise ConfigError("model.attention_impl: 'cudnn' cannot mask packed segments (jax.nn.dot_product_attention "
                          "takes no segment ids); set data.packing.enabled=false or use attention_impl=xla")
    return requested, f"{requested} (model.attention_impl)"


def _sharded(fn, q, k, v, segment_ids):
    """Runs `fn` per shard under the ambient mesh: batch and heads split by the rule table's logical axes
    ("batch", "act_heads"), whole sequences per shard (the kernels see every key of a query's row)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return fn(q, k, v, segment_ids)
    batch, heads = nn.logical_to_mesh_axes(("batch", "act_heads"))
    qkv, seg = P(batch, None, heads, None), P(batch, None)
    return jax.shard_map(fn, mesh=mesh, in_specs=(qkv, qkv, qkv, seg), out_specs=qkv, check_vma=False)(
        q, k, v, segment_ids)


def _splash_local(q, k, v, segment_ids, *, interpret: bool):
    b, s, hq, d = q.shape
    pad = -s % LANES
    if pad:  # padded keys get their own segment (-1) so no real query sees them and no padded row is empty
        q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
        segment_ids = jnp.pad(segment_ids, ((0, 0), (0, pad)), constant_values=-1)
    length = s + pad
    block = math.gcd(length, MAX_BLOCK)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    mask = splash_mask.MultiHeadMask([splash_mask.CausalMask((length, length))] * hq)
    kernel = splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)
    heads_first = functools.partial(jnp.swapaxes, axis1=1, axis2=2)
    segment_ids = segment_ids.astype(jnp.int32)
    # Ours scales fp32 scores; the kernel takes pre-scaled queries (as MaxText passes them).
    out = jax.vmap(kernel)(heads_first(q * jnp.asarray(d ** -0.5, q.dtype)), heads_first(k), heads_first(v),
                           segment_ids=splash.SegmentIds(segment_ids, segment_ids))
    return heads_first(out)[:, :s]


def splash_attention(q, k, v, mask: CausalSegments, *, interpret: bool = False):
    """Pallas TPU splash attention (grouped-query heads natively, fp32 softmax). q: (B, S, Hq, D); k, v:
    (B, S, Hkv, D). `interpret` runs the kernel in Pallas' interpreter (any platform; tests)."""
    return _sharded(functools.partial(_splash_local, interpret=interpret), q, k, v, mask.segment_ids)


def cudnn_attention(q, k, v, mask: CausalSegments):
    """cuDNN flash attention, causal. Rows are one segment plus trailing padding (packing is refused in
    `choose_attention_impl`): padded queries differ from the XLA path, real ones do not, and the loss
    ignores padding."""
    def local(q, k, v, segment_ids):
        del segment_ids
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    return _sharded(local, q, k, v, mask.segment_ids)


KERNELS = {"splash": splash_attention, "cudnn": cudnn_attention}


@functools.cache
def platform_choice() -> str:
    """What "auto" runs where no entry point resolved it first (the trainer and `plan` do, knowing packing
    and the target): this process's platform, unpacked rows (eval, generation). Announced once."""
    impl, why = choose_attention_impl("auto", jax.default_backend(), packed=False)
    logging.warning("attention: %s", why)
    return impl


def kernel_for(impl: str):
    """The kernel function of `impl`, or None for the XLA path."""
    return KERNELS.get(platform_choice() if impl == "auto" else impl)
