"""CLIP / SigLIP dual encoders against transformers, two-way conversion, and the contrastive losses: equal to
transformers' and identical whether the batch sits on one device or is sharded over 8 (global negatives)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from hf_models import assert_same_tensors, tiny_dual_encoder
from vlm_jax.convert import from_hf, to_hf
from vlm_jax.convert.keymap import flatten
from vlm_jax.convert.safetensors_io import read_dir
from vlm_jax.objectives.contrastive import clip_loss, retrieval_metrics, retrieval_recall, siglip_loss

LOSSES = {"clip": lambda o: clip_loss(o["image_embeds"], o["text_embeds"], o["logit_scale"]),
          "siglip": lambda o: siglip_loss(o["image_embeds"], o["text_embeds"], o["logit_scale"], o["logit_bias"])}


@pytest.fixture(scope="module", params=["clip", "siglip"])
def hf_dual(request, tmp_path_factory):
    model = tiny_dual_encoder(request.param)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return request.param, model, str(path)


def _batch(n=4, seq=12, seed=0):
    """Texts of different lengths: eos (98) at different places, padding (99) after it."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 90, size=(n, seq))
    ids[:, 0] = 97
    for i, end in enumerate([5, 11, 7, 9][:n]):
        ids[i, end], ids[i, end + 1:] = 98, 99
    return ids, rng.standard_normal((n, 3, 28, 28)).astype(np.float32)


def test_embeddings_logits_and_loss_match_transformers(hf_dual):
    family, hf_model, path = hf_dual
    model, params = from_hf(path, dtype="float32")
    ids, pixels = _batch()
    with torch.no_grad():
        ref = hf_model(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(pixels), return_loss=True)
    ours = jax.jit(model.apply)({"params": params}, ids, pixels)
    for key in ("image_embeds", "text_embeds", "logits_per_text"):
        err = np.abs(np.asarray(ours[key]) - getattr(ref, key).numpy()).max()
        print(f"{family} {key}: max |diff| = {err:.2e}")
        assert err <= 1e-4, key
    np.testing.assert_allclose(float(LOSSES[family](ours)), float(ref.loss), rtol=1e-5)


def test_hf_to_ours_to_hf_is_bitwise(hf_dual, tmp_path):
    _, _, path = hf_dual
    model, params = from_hf(path)
    to_hf(model, params, str(tmp_path))
    assert_same_tensors(read_dir(path), read_dir(str(tmp_path)))
    for scan in (True, False):
        model, params = from_hf(path, scan_layers=scan)
        to_hf(model, params, str(tmp_path / f"again_{scan}"))
        _, again = from_hf(str(tmp_path / f"again_{scan}"), scan_layers=scan)
        for key, value in flatten(params).items():
            np.testing.assert_array_equal(flatten(again)[key], value, err_msg=key)


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_loss_is_the_same_on_one_and_eight_devices(family):
    """Negatives come from the global batch: sharding the batch over 8 devices changes nothing, while a
    per-device (local) loss would differ."""
    assert jax.device_count() == 8
    rng = np.random.default_rng(1)
    embeds = [rng.standard_normal((16, 8)).astype(np.float32) for _ in range(2)]
    embeds = [e / np.linalg.norm(e, axis=-1, keepdims=True) for e in embeds]
    scale, bias = jnp.float32(2.3), jnp.float32(-3.0)
    loss = (lambda i, t: clip_loss(i, t, scale)) if family == "clip" else (lambda i, t: siglip_loss(i, t, scale, bias))
    with jax.default_device(jax.devices()[0]):
        single = float(jax.jit(loss)(*embeds))
    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharded = [jax.device_put(e, NamedSharding(mesh, P("data"))) for e in embeds]
    assert len(sharded[0].sharding.device_set) == 8
    global_value = float(jax.jit(loss)(*sharded))
    np.testing.assert_allclose(global_value, single, rtol=1e-6)
    local = np.mean([float(loss(embeds[0][i:i + 2], embeds[1][i:i + 2])) for i in range(0, 16, 2)])
    assert abs(local - single) > 1e-3


def test_retrieval_recall():
    sim = jnp.array([[0.9, 0.1, 0.0], [0.8, 0.5, 0.0], [0.0, 0.2, 0.1]])  # query 1's match ranks 2nd, 2's 2nd
    recall = retrieval_recall(sim, ks=(1, 2, 3))
    assert [float(recall[f"recall@{k}"]) for k in (1, 2, 3)] == pytest.approx([1 / 3, 1.0, 1.0])
    eye = jnp.eye(12)
    metrics = retrieval_metrics(eye, eye)
    assert float(metrics["text_to_image/recall@1"]) == float(metrics["image_to_text/recall@10"]) == 1.0
