"""Model options: bf16 compute with fp32 params, remat policies (same gradients), packed segments."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hf_models import mllama_batch
from vlm_jax.convert import from_hf


def _loss_fn(model, batch):
    def loss(params):
        logits = model.apply({"params": params}, **batch)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(
            logits, batch["input_ids"][..., None], -1)[..., 0])
    return loss


def test_bfloat16_compute_tracks_float32(hf_mllama_dir):
    batch = mllama_batch()
    _, path = hf_mllama_dir
    model32, params = from_hf(path, dtype="float32")
    model16, params16 = from_hf(path, dtype="bfloat16")
    assert params16["text"]["lm_head"]["kernel"].dtype == np.float32  # fp32 parameters
    ref = np.asarray(jax.jit(model32.apply)({"params": params}, **batch))
    out = jax.jit(model16.apply)({"params": params16}, **batch)
    assert out.dtype == jnp.float32
    err = np.abs(np.asarray(out) - ref).max()
    assert 0 < err < 0.05 * np.abs(ref).max()


def _remat_count(model, params, batch) -> int:
    """How many rematerialised (checkpointed) calls the gradient's program holds."""
    return str(jax.make_jaxpr(jax.grad(_loss_fn(model, batch)))(params)).count("remat")


@pytest.mark.parametrize("policies", [{"remat_policy": "full"}, {"remat_policy": "dots_no_batch"},
                                      {"vision_remat_policy": "full"}])
def test_remat_policies_give_the_same_gradients(hf_mllama_dir, policies):
    batch = mllama_batch()
    base, params = from_hf(hf_mllama_dir[1], dtype="float32")
    remat, _ = from_hf(hf_mllama_dir[1], dtype="float32", **policies)
    g_ref = jax.jit(jax.grad(_loss_fn(base, batch)))(params)
    g = jax.jit(jax.grad(_loss_fn(remat, batch)))(params)
    for a, b in zip(jax.tree.leaves(g_ref), jax.tree.leaves(g)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5)


def test_the_vision_towers_take_their_own_remat_policy(hf_mllama_dir):
    batch = mllama_batch()
    counts = {}
    for name, policies in {"none": {}, "vision": {"vision_remat_policy": "full"}, "all": {"remat_policy": "full"},
                           "text": {"remat_policy": "full", "vision_remat_policy": "none"}}.items():
        model, params = from_hf(hf_mllama_dir[1], dtype="float32", **policies)
        counts[name] = _remat_count(model, params, batch)
    # the two towers (local and global layers) alone, the decoder alone, and all of them
    assert counts["none"] == 0 and 0 < counts["vision"] < counts["all"]
    assert counts["vision"] + counts["text"] == counts["all"], counts


def test_packed_segments_do_not_see_each_other(hf_mllama_dir):
    """Two text samples packed in one row give the logits each gets alone (segment ids + restarted positions)."""
    model, params = from_hf(hf_mllama_dir[1], dtype="float32")
    ids = mllama_batch()["input_ids"][2]
    a, b = ids[:7], ids[7:]
    alone_a = np.asarray(model.apply({"params": params}, a[None]))[0]
    alone_b = np.asarray(model.apply({"params": params}, b[None]))[0]
    packed = np.asarray(model.apply({"params": params}, ids[None],
                                    segment_ids=np.array([[1] * 7 + [2] * 9]),
                                    positions=np.array([list(range(7)) + list(range(9))])))[0]
    np.testing.assert_allclose(packed[:7], alone_a, atol=1e-5)
    np.testing.assert_allclose(packed[7:], alone_b, atol=1e-5)
