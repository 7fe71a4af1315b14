"""Attention kernels (`model.attention_impl`): Pallas splash attention, run in Pallas' interpreter on CPU,
against the XLA path (forward and gradients, packed segments, grouped-query heads, under a batch x heads
mesh); which impl `auto` picks per platform; and the one-line refusals."""
import functools
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from vlm_jax import sharding
from vlm_jax.config import load_config
from vlm_jax.errors import ConfigError, UserError
from vlm_jax.models import attention
from vlm_jax.models.attention import CausalSegments, choose_attention_impl
from vlm_jax.models.layers import dot_product_attention


def packed_rows(s):
    """Row 0: two packed segments then padding; row 1: one segment filling the row (positions restart per
    segment, as packing writes them)."""
    seg0 = np.repeat([1, 2, 0], [40, 45, s - 85])
    pos0 = np.concatenate([np.arange(40), np.arange(45), np.zeros(s - 85, int)])
    return (jnp.asarray(np.stack([seg0, np.ones(s, int)]), jnp.int32),
            jnp.asarray(np.stack([pos0, np.arange(s)]), jnp.int32))


@pytest.mark.slow  # Pallas interprets the kernel: 7 s, 34 s on the loaded 2 cores
def test_splash_interpreted_matches_xla_forward_and_grads(monkeypatch):
    # 100 tokens: the kernel pads to its 128-token block, so the padding path is exercised too.
    b, s, hq, hkv, d = 2, 100, 4, 2, 32
    monkeypatch.setitem(attention.KERNELS, "splash", functools.partial(attention.splash_attention, interpret=True))
    segments, positions = packed_rows(s)
    mask = CausalSegments(segments, positions)
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    q = jax.random.normal(keys[0], (b, s, hq, d))
    k = jax.random.normal(keys[1], (b, s, hkv, d))
    v = jax.random.normal(keys[2], (b, s, hkv, d))
    weights = jax.random.normal(keys[3], (b, s, hq, d)) * (segments > 0)[:, :, None, None]

    def loss_and_out(impl, q, k, v):
        out = dot_product_attention(q, k, v, mask, impl=impl)
        return jnp.sum(out * weights), out  # padding rows carry no loss, as in training

    mesh = Mesh(np.array(jax.devices()[:4]).reshape(1, 2, 2), ("data", "fsdp", "tensor"))
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.load_rules("fsdp_tp")):  # batch and heads split 2 x 2
        results = {impl: jax.jit(jax.grad(functools.partial(loss_and_out, impl), argnums=(0, 1, 2), has_aux=True))(
            q, k, v) for impl in ("xla", "splash")}
    (grads_xla, out_xla), (grads_splash, out_splash) = results["xla"], results["splash"]
    real = np.asarray(segments > 0)
    np.testing.assert_allclose(np.asarray(out_splash)[real], np.asarray(out_xla)[real], atol=1e-5, rtol=1e-5)
    for got, want in zip(grads_splash, grads_xla):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)


def test_kernels_leave_other_masks_to_xla(monkeypatch):
    """Dense masks (cross-attention, cached decoding) and no mask (vision towers) never reach a kernel."""
    def refuse(*args):
        raise AssertionError("a kernel ran for a dense mask")
    monkeypatch.setitem(attention.KERNELS, "splash", refuse)
    q = k = v = jnp.ones((1, 4, 2, 8))
    dense = jnp.tril(jnp.ones((4, 4), bool))[None, None]
    for mask in (dense, None):
        np.testing.assert_allclose(dot_product_attention(q, k, v, mask, impl="splash"),
                                   dot_product_attention(q, k, v, mask, impl="xla"))


@pytest.mark.parametrize("platform,packed,impl", [
    ("tpu", True, "splash"), ("gpu", False, "cudnn"), ("gpu", True, "xla"), ("cpu", False, "xla")])
def test_auto_picks_per_platform_and_says_why(platform, packed, impl):
    chosen, why = choose_attention_impl("auto", platform, packed)
    assert chosen == impl and why.startswith(f"auto: {impl} on {platform}")


def test_auto_unresolved_uses_this_platform_announced_once(caplog):
    attention.platform_choice.cache_clear()
    with caplog.at_level(logging.WARNING):
        assert attention.kernel_for("auto") is None and attention.kernel_for("auto") is None  # CPU: xla
    assert [r.getMessage() for r in caplog.records] == [
        "attention: auto: xla on cpu (no attention kernel for this platform)"]


@pytest.mark.parametrize("requested,platform,packed,message", [
    ("splash", "cpu", False, "model.attention_impl: 'splash' runs on tpu, not on cpu; use model.attention_impl=auto"),
    ("cudnn", "tpu", False, "model.attention_impl: 'cudnn' runs on gpu, not on tpu"),
    ("cudnn", "gpu", True, "model.attention_impl: 'cudnn' cannot mask packed segments"),
])
def test_kernel_the_platform_cannot_run_is_one_line(requested, platform, packed, message):
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(").replace(")", r"\)")) as e:
        choose_attention_impl(requested, platform, packed)
    assert "\n" not in str(e.value)


def test_unknown_attention_impl_is_one_line():
    with pytest.raises(UserError, match=r"model.attention_impl: 'flash' is not one of \('xla', 'splash', 'cudnn'"):
        load_config(None, ["model.attention_impl=flash"])
