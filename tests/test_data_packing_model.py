"""A packed batch gives every sample the same loss as the same samples unpacked, through the tiny Mllama."""
import os

import flax.linen as nn
import jax
import numpy as np

from vlm_jax.config import load_config
from vlm_jax.data import DataConfig, PackingConfig, ShapeConfig, SourceConfig, WorkerConfig, build_pipeline
from vlm_jax.families import input_spec
from vlm_jax.families import build_model, init_params
from vlm_jax.families.mllama import Mllama
from vlm_jax.objectives.next_token import next_token_targets

from test_data_pipeline import sample_ids  # noqa: F401  (also registers the "counting" source)
from test_data_pipeline import tokenizer  # noqa: F401  (pytest fixture)

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "models",
                    "tiny_mllama.yaml")


def per_sample_loss(apply, params, batch, tokenizer) -> dict[int, float]:
    """Summed next-token NLL of each segment's supervised tokens, keyed by the sample's record number."""
    inputs = {k: batch[k] for k in Mllama.model_inputs}
    logits = np.asarray(apply({"params": params}, **inputs), np.float64)
    targets, weights = map(np.asarray, next_token_targets(batch["input_ids"], batch["loss_mask"]))
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    nll = (lse - np.take_along_axis(logits, np.clip(targets, 0, logits.shape[-1] - 1)[..., None], -1)[..., 0])
    ids = iter(sample_ids(batch, tokenizer))
    losses = {}
    for b in range(batch["input_ids"].shape[0]):
        seg = batch["segment_ids"][b]
        for s in np.unique(seg[seg > 0]):
            losses[next(ids)] = float(np.sum((nll[b] * weights[b])[seg == s]))  # weight at s-1 scores token s
    return losses


def test_packed_loss_equals_unpacked_loss(tokenizer):  # noqa: F811
    model_cfg = load_config(TINY).model
    spec = input_spec(model_cfg)
    spec = spec.__class__(**{**spec.__dict__, "image_token_id": None})  # the test tokenizer's own <|image|> id
    model = build_model(model_cfg)
    params = nn.meta.unbox(jax.jit(lambda rng: init_params(model, rng))(jax.random.PRNGKey(0)))
    params = jax.tree_util.tree_map_with_path(  # gates start at 0; open them so images change every loss
        lambda path, x: x + 0.7 if "gate" in jax.tree_util.keystr(path) else x, params)
    apply = jax.jit(model.apply)

    def batches(pack: bool):  # the same (2, 64) shape both ways, so the model compiles once
        cfg = DataConfig(sources=(SourceConfig("counting", "n", size=1000),), seed=1,
                         shapes=ShapeConfig(batch_size=2, seq_len=64, max_images=4),
                         packing=PackingConfig(pack), workers=WorkerConfig(prefetch_batches=0))
        return build_pipeline(cfg, tokenizer, spec)

    packed = next(batches(True))
    assert (packed["segment_ids"].max(1) >= 3).all()  # several samples share each row
    packed_losses = per_sample_loss(apply, params, packed, tokenizer)
    unpacked, unpacked_losses = batches(False), {}
    while not set(packed_losses) <= set(unpacked_losses):
        unpacked_losses.update(per_sample_loss(apply, params, next(unpacked), tokenizer))
    for sample, loss in packed_losses.items():
        assert loss > 0.1
        np.testing.assert_allclose(loss, unpacked_losses[sample], rtol=0, atol=1e-5, err_msg=f"sample {sample}")
