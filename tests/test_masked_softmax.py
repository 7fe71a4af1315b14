"""`layers.masked_softmax`, attention's softmax with its own backward: against JAX's autodiff of the same masked
softmax (jax.nn.softmax, `where`, rows with no allowed key zeroed), on the masks attention passes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax.models.layers import masked_softmax


def _autodiff_masked_softmax(scores, mask):
    if mask is None:
        return jax.nn.softmax(scores, axis=-1)
    probs = jax.nn.softmax(jnp.where(mask, scores, jnp.finfo(scores.dtype).min), axis=-1)
    return probs * jnp.any(mask, axis=-1, keepdims=True)


def _masks(shape):
    b, g, r, sq, sk = shape
    causal = np.tril(np.ones((sq, sk), bool))[None, None, None]
    padded = np.ones((b, 1, 1, sq, sk), bool)
    padded[0, :, :, 2] = False  # a query with no allowed key (a padded slot of a cross-attention row)
    padded[1, :, :, :, -2:] = False  # padded keys
    return {"none": None, "causal, broadcast over batch and heads": causal, "padded rows and keys": padded}


@pytest.mark.parametrize("name", list(_masks((2, 2, 3, 5, 5))))
def test_masked_softmax_and_its_gradient_are_autodiffs(name):
    shape = (2, 2, 3, 5, 5)  # (B, Hkv, R, Sq, Sk) as dot_product_attention calls it
    mask = _masks(shape)[name]
    ks, kc = jax.random.split(jax.random.PRNGKey(0))
    scores, cotangent = 3 * jax.random.normal(ks, shape), jax.random.normal(kc, shape)

    def pullback(fn):
        y, vjp = jax.vjp(lambda s: fn(s, mask), scores)
        return y, vjp(cotangent)[0]

    (y, grad), (y_ref, grad_ref) = pullback(masked_softmax), pullback(_autodiff_masked_softmax)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y_ref))
    np.testing.assert_allclose(np.asarray(grad), np.asarray(grad_ref), rtol=1e-5, atol=1e-6)
    if mask is not None:
        assert not np.asarray(y)[~np.broadcast_to(mask, shape)].any()
        assert not np.asarray(grad)[~np.broadcast_to(mask, shape)].any()


def test_masked_softmax_under_jit_and_remat():
    scores = jax.random.normal(jax.random.PRNGKey(1), (1, 2, 1, 4, 6))
    mask = np.ones((1, 1, 1, 4, 6), bool)
    mask[..., 0, 3:] = False
    loss = lambda s: jnp.sum(masked_softmax(s, mask) ** 2)  # noqa: E731
    np.testing.assert_allclose(np.asarray(jax.jit(jax.grad(jax.checkpoint(loss)))(scores)),
                               np.asarray(jax.grad(lambda s: jnp.sum(_autodiff_masked_softmax(s, mask) ** 2))(scores)),
                               rtol=1e-5, atol=1e-6)
