"""Numerical parity with transformers' PyTorch Mllama (fp32, tiny random model, non-zero gates)."""
import jax
import numpy as np
import pytest
import torch

from hf_models import mllama_batch, torch_inputs
from vlm_jax.convert import from_hf


def _hf_logits(hf_model, batch):
    with torch.no_grad():
        return hf_model(**torch_inputs(batch)).logits.numpy()


@pytest.mark.parametrize("scan_layers", [True, False])
def test_logits_match_transformers(hf_mllama_dir, scan_layers):
    hf_model, path = hf_mllama_dir
    model, params = from_hf(path, dtype="float32", scan_layers=scan_layers)
    batch = mllama_batch()
    ref = _hf_logits(hf_model, batch)
    ours = np.asarray(model.apply({"params": params}, **batch))
    assert ours.shape == ref.shape == (3, 16, 128)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    # The images really matter: the text-only path differs on rows that see an image.
    text_only = np.asarray(model.apply({"params": params}, batch["input_ids"]))
    assert np.abs(text_only[0, 4:] - ref[0, 4:]).max() > 1e-2


def test_vision_features_match_transformers(hf_mllama_dir):
    hf_model, path = hf_mllama_dir
    model, params = from_hf(path, dtype="float32")
    batch = mllama_batch()
    keys = ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")
    with torch.no_grad():
        ref = hf_model.model.vision_model(**torch_inputs({k: batch[k] for k in keys})).last_hidden_state.numpy()
    ours = model.apply({"params": params}, *(batch[k] for k in keys),
                       method=lambda m, *a: m.vision(*a))
    assert ours.shape == ref.shape == (3, 2, 4, 17, 96)
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=0)


def test_text_only_input_matches_transformers(hf_mllama_dir):
    hf_model, path = hf_mllama_dir
    model, params = from_hf(path, dtype="float32")
    ids = mllama_batch()["input_ids"][2:]
    with torch.no_grad():
        ref = hf_model(input_ids=torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(model.apply({"params": params}, ids)), ref, atol=1e-4, rtol=0)


def test_zero_gates_equal_text_only_path(hf_mllama_dir):
    _, path = hf_mllama_dir
    model, params = from_hf(path, dtype="float32")
    decoder = params["text"]["decoder"]
    for layer in decoder.values():
        if "attn_gate" in layer:
            layer["attn_gate"] = np.zeros_like(layer["attn_gate"])
            layer["mlp_gate"] = np.zeros_like(layer["mlp_gate"])
    batch = mllama_batch()
    with_images = np.asarray(model.apply({"params": params}, **batch))
    text_only = np.asarray(model.apply({"params": params}, batch["input_ids"]))
    np.testing.assert_array_equal(with_images, text_only)


def test_kv_cache_decode_matches_full_forward(hf_mllama_dir):
    """Prefill a prompt with images, then decode token by token with cached keys/values (cross-attention
    states computed once): every step's logits equal the full causal forward pass."""
    _, path = hf_mllama_dir
    model, params = from_hf(path, dtype="float32")
    decoder = model.clone(decode=True)
    batch = mllama_batch()
    full = np.asarray(model.apply({"params": params}, **batch))
    b, s = batch["input_ids"].shape
    prefill = 10
    positions = np.broadcast_to(np.arange(s), (b, s))
    cache = decoder.init(jax.random.PRNGKey(0), **batch, positions=positions)["cache"]
    cut = {k: (v[:, :prefill] if k in ("input_ids", "cross_attention_mask") else v) for k, v in batch.items()}
    logits, state = decoder.apply({"params": params, "cache": cache}, **cut, positions=positions[:, :prefill],
                                  mutable=["cache"])
    np.testing.assert_allclose(np.asarray(logits), full[:, :prefill], atol=1e-5)
    for i in range(prefill, s):
        logits, state = decoder.apply(
            {"params": params, "cache": state["cache"]}, batch["input_ids"][:, i:i + 1],
            cross_attention_mask=batch["cross_attention_mask"][:, i:i + 1], positions=positions[:, i:i + 1],
            mutable=["cache"])
        np.testing.assert_allclose(np.asarray(logits)[:, 0], full[:, i], atol=1e-5)


def test_intermediate_layer_convention_input_is_previous_output(hf_mllama_dir):
    """'input' index i (the state entering layer i: Meta, transformers 4.x) equals 'output' index i-1 (5.x)."""
    from vlm_jax.config import to_dict
    from vlm_jax.convert import config_from_hf
    _, path = hf_mllama_dir
    batch = mllama_batch()
    vision = to_dict(config_from_hf(path).vision)
    features = {}
    for convention, indices in (("input", [1, 3]), ("output", [0, 2])):
        model, params = from_hf(path, dtype="float32", vision={
            **vision, "intermediate_layers_convention": convention, "intermediate_layers_indices": indices})
        features[convention] = np.asarray(model.apply(
            {"params": params}, batch["pixel_values"], batch["aspect_ratio_ids"], batch["aspect_ratio_mask"],
            method=lambda m, *a: m.vision(*a)))[..., 32:]  # the interleaved intermediate channels
    np.testing.assert_allclose(features["input"], features["output"], atol=1e-6)
