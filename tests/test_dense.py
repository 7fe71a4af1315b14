"""`layers.dense`, the projection every Linear layer and the LM head run: its hand-written backward against JAX's
own autodiff of the same dot_general, and the "dots" remat policies still saving its output."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

from vlm_jax.models.layers import DENSE_OUTPUT, REMAT_POLICIES, dense


def _autodiff_dense(x, kernel, n):
    return jax.lax.dot_general(x, kernel, ((tuple(range(x.ndim - n, x.ndim)), tuple(range(n))), ((), ())))


@pytest.mark.parametrize("x_shape,kernel_shape,n", [
    ((3, 5, 8), (8, 6), 1),  # (B, S, in) -> (B, S, out)
    ((3, 5, 8), (8, 2, 4), 1),  # q projection: (B, S, E) -> (B, S, heads, head_dim)
    ((3, 5, 2, 4), (2, 4, 8), 2),  # o projection: (B, S, heads, head_dim) -> (B, S, E)
    ((7, 8), (8, 6), 1),
])
def test_dense_gradients_are_autodiffs(x_shape, kernel_shape, n):
    kx, kk, kc = jax.random.split(jax.random.PRNGKey(0), 3)
    x, kernel = jax.random.normal(kx, x_shape), jax.random.normal(kk, kernel_shape)
    cotangent = jax.random.normal(kc, x_shape[:len(x_shape) - n] + kernel_shape[n:])

    def pullback(fn):
        y, vjp = jax.vjp(lambda a, b: fn(a, b, n), x, kernel)
        return y, vjp(cotangent)

    (y, grads), (y_ref, grads_ref) = pullback(dense), pullback(_autodiff_dense)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y_ref))
    for g, g_ref in zip(grads, grads_ref):
        assert g.shape == g_ref.shape
        np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), rtol=1e-5, atol=1e-5)


def test_dense_keeps_its_dtype_in_the_backward():
    x, kernel = jnp.ones((2, 3, 4), jnp.bfloat16), jnp.ones((4, 5), jnp.bfloat16)
    gx, gk = jax.grad(lambda a, b: jnp.sum(dense(a, b).astype(jnp.float32)), argnums=(0, 1))(x, kernel)
    assert gx.dtype == gk.dtype == jnp.bfloat16


@pytest.mark.parametrize("policy,saved", [("dots", 2), ("dots_no_batch", 2), ("full", 0)])
def test_remat_policies_save_dense_outputs(policy, saved, capsys):
    """A custom_vjp call is no dot_general to `checkpoint_dots`: the policies save `dense` outputs by name, so a
    "dots" layer keeps its projections rather than recomputing them."""
    def layer(kernels, x):
        return jnp.sum(jnp.sin(dense(jnp.tanh(dense(x, kernels[0])), kernels[1])))
    kernels, x = (jnp.ones((4, 6)), jnp.ones((6, 4))), jnp.ones((2, 3, 4))
    print_saved_residuals(jax.checkpoint(layer, policy=REMAT_POLICIES[policy]), kernels, x)
    residuals = capsys.readouterr().out
    assert residuals.count(f"named '{DENSE_OUTPUT}'") == saved, residuals
