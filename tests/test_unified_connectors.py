"""Connectors without an HF counterpart (perceiver resampler, POINTS dual-encoder merge), pixel-shuffle token
order, static-shape scatter, and packing in the unified model."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hf_models import IMAGE_TOKEN, unified_batch
from vlm_jax.config import ConnectorConfig, load_config
from vlm_jax.models.connectors import pixel_shuffle
from vlm_jax.models.unified import scatter_into_tokens, tokens_per_image
from vlm_jax.families import build_model, init_params


def _tiny(**model_overrides):
    cfg = load_config("configs/models/tiny_llava.yaml").model
    return dataclasses.replace(cfg, **model_overrides)


def _init(model):
    return nn.meta.unbox(jax.jit(lambda: init_params(model, jax.random.PRNGKey(0)))())


def _grad_norms(model, params, batch):
    """Gradient norm per parameter path of a toy loss on the logits."""
    grads = jax.jit(jax.grad(lambda p: jnp.mean(model.apply({"params": p}, **batch) ** 2)))(params)
    return {"/".join(str(k.key) for k in path): float(jnp.linalg.norm(g))
            for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]}


def test_perceiver_resampler_shapes_and_gradients():
    cfg = _tiny(connector=ConnectorConfig(kind="perceiver", num_latents=5, num_layers=2, num_heads=4))
    assert tokens_per_image(cfg) == 5
    model = build_model(cfg)
    params = _init(model)
    batch = unified_batch(5, images_per_row=(2, 1))
    tokens = model.apply({"params": params}, jnp.asarray(batch["pixel_values"]),
                         method=lambda m, px: m.encode_images(px))
    assert tokens.shape == (2, 2, 5, 64)
    grads = _grad_norms(model, params, batch)
    for name in ("connector/latents", "connector/input_proj/kernel", "connector/attn_1/q_proj/kernel",
                 "vision/patch_embedding/kernel"):
        assert grads[name] > 0, name


def test_points_dual_encoder_merge_trains_both_towers():
    cfg = _tiny(connector=ConnectorConfig(kind="dual_mlp", feature_layers=(-2,)), ocr_vit=_tiny().vit)
    model = build_model(cfg)
    params = _init(model)
    assert params["connector"]["merge_logits"].shape == (2,)
    batch = unified_batch(tokens_per_image(cfg), images_per_row=(1, 2))
    assert model.apply({"params": params}, **batch).shape == (2, 40, 128)
    grads = _grad_norms(model, params, batch)
    for name in ("vision/patch_embedding/kernel", "ocr_vision/patch_embedding/kernel", "connector/merge_logits"):
        assert grads[name] > 0, name


def test_pixel_shuffle_token_order():
    x = jnp.arange(16.0)[None, :, None]  # patch (r, c) of a 4x4 grid carries r*4 + c
    out = np.asarray(pixel_shuffle(x, 2))[0]
    np.testing.assert_array_equal(out, [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]])


def test_scatter_skips_padding_slots_in_row_major_order():
    feats = jnp.arange(1.0, 9.0).reshape(2, 2, 2, 1)  # (B, N, T, H): slot (b, n) token t = 1 + 4b + 2n + t
    real = jnp.array([[True, False], [True, True]])
    is_image = jnp.array([[0, 1, 1, 0, 0], [1, 0, 1, 1, 1]], bool)
    out = np.asarray(scatter_into_tokens(feats, real, is_image))[..., 0]
    np.testing.assert_array_equal(out[is_image], [1, 2, 5, 6, 7, 8])


def test_packed_rows_equal_separate_rows():
    """Two samples packed in one row (segment ids, restarting positions) give each sample's own logits."""
    model = build_model(_tiny())
    params = _init(model)
    a = unified_batch(16, seed=1, seq_len=20, num_slots=1, images_per_row=(1,))
    b = unified_batch(16, seed=2, seq_len=20, num_slots=1, images_per_row=(1,))
    apply = jax.jit(model.apply)
    alone = [np.asarray(apply({"params": params}, **x))[0] for x in (a, b)]
    packed = apply({"params": params}, np.concatenate([a["input_ids"], b["input_ids"]], 1),
                   np.concatenate([a["pixel_values"], b["pixel_values"]], 1),
                   segment_ids=np.repeat([[1, 2]], 20, axis=1), positions=np.tile(np.arange(20), 2)[None])
    np.testing.assert_allclose(np.asarray(packed)[0], np.concatenate(alone), atol=1e-5)
    assert (a["input_ids"] == IMAGE_TOKEN - 1).sum() == 16
