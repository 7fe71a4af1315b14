"""Unified (LLaVA, Idefics3) models train through the Grain pipeline like the cross-attention family: the shipped
configs/examples/digits_llava.yaml learns on the embedded digits task, logs held-out eval, and a run cut in two
resumes bitwise exactly with the data stream continuing. Also: the data spec each model implies, the batch keys
it takes, and its FLOP count. Idefics3 is checked up to the batch (training it would compile another model)."""
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax.config import load_config
from vlm_jax.families import get_family, input_spec, model_inputs
from vlm_jax.data.spec import CLIP_MEAN, SIGLIP_MEAN
from vlm_jax.errors import ConfigError
from vlm_jax.registry import CONNECTORS
from vlm_jax.models.unified import tokens_per_image
from vlm_jax.families import build_model, init_params
from vlm_jax.train import flops
from vlm_jax.train.data.pipeline import PipelineData
from vlm_jax.train.recipe import resolve_stages
from train_helpers import (ROOT, check_learning_run, check_resume_matches_reference, data_iter, final_params, reference_run)

EXAMPLE = os.path.join(ROOT, "configs", "examples", "digits_llava.yaml")
MODELS = os.path.join(ROOT, "configs", "models")
STEPS = 8
RUN = ["train.schedule={kind: cosine, learning_rate: 2.0e-3, warmup_steps: 2}", "train.log.every_steps=1",
       "train.checkpoint={every_steps: 4, async_save: false}"]
FULL = [f"train.steps={STEPS}", "train.eval_every=4", "train.eval_batches=3", *RUN]
# The same single stage, cut at half: `train.steps` then only says where this run stops (same schedule).
CUT = [f"train.stages=[{{name: train, steps: {STEPS}}}]", *RUN]


def example_config(workdir, *overrides):
    return load_config(EXAMPLE, [f"workdir={workdir}", *overrides])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return reference_run(tmp_path_factory, example_config, FULL)


def test_llava_trains_on_embedded_task_and_logs_eval(reference):
    workdir, trainer, result = reference
    records = check_learning_run(result, workdir, STEPS, [4, 8])
    assert all(0 < r["supervised_fraction"] < 1 and r["mfu"] > 0 for r in records)
    # Packed rows: two ~30-token samples (16 image tokens each) per 64-token row, so two images per row.
    assert len(trainer.batches) == STEPS
    rows = [h for batch in trainer.batches for h in batch]
    assert len(set(rows)) == len(rows) == STEPS * 8


def test_llava_resume_continues_data_stream_and_is_bitwise_exact(reference, tmp_path):
    workdir = str(tmp_path / "cut")
    check_resume_matches_reference(reference, example_config, workdir, CUT, STEPS)
    (state,) = data_iter(workdir, STEPS // 2)["iter"]["process_states"]
    assert state["next"] >= STEPS // 2 * 8 * 2  # packed: two samples per row
    assert any(k.startswith("connector/") for k in final_params(workdir))


@pytest.mark.parametrize("model", ["tiny_llava", "tiny_idefics3"])
def test_pipeline_batches_hold_one_image_token_per_connector_output(model, tmp_path):
    """What the model's scatter relies on: <image> tokens = real image slots x tokens per image, row by row.
    (Training the tiny Idefics3 costs another ~40 s of compiling on 2 cores; its forward is covered by the
    parity tests, its data path here.)"""
    config = tmp_path / "digits.yaml"  # the example's data and run, on the chosen tiny model
    config.write_text(f"base: [{EXAMPLE}, {os.path.join(MODELS, model + '.yaml')}]\n")
    cfg = load_config(str(config), [f"workdir={tmp_path}", "model.image_token_index=1"])
    assert cfg.model == dataclasses.replace(load_config(os.path.join(MODELS, model + ".yaml")).model,
                                            image_token_index=1)
    data = PipelineData(cfg, resolve_stages(cfg.train), get_family(cfg.model), echo=lambda _: None)
    iterator = data.iterator(0, {})
    try:
        batch = next(iterator)
    finally:
        iterator.close()
    per_image = tokens_per_image(cfg.model)
    assert data.spec.tokens_per_image == per_image == {"tiny_llava": 16, "tiny_idefics3": 4}[model]
    image_tokens = (batch["input_ids"] == 1).sum(axis=1)
    np.testing.assert_array_equal(image_tokens, batch["image_mask"].sum(axis=1) * per_image)
    assert batch["image_mask"].sum() > 8  # packing put several samples (one image each) in some rows
    assert set(model_inputs(batch, cfg.model)) == {"input_ids", "pixel_values", "image_mask", "segment_ids",
                                                   "positions"}


# ------------------------------------------------------------------------------ spec, inputs, FLOPs (no training)


def _model(name, **connector):
    cfg = load_config(os.path.join(MODELS, f"{name}.yaml")).model
    return dataclasses.replace(cfg, connector=dataclasses.replace(cfg.connector, **connector)) if connector else cfg


@pytest.mark.parametrize("name,connector,tokens,mean", [
    ("tiny_llava", {}, 16, CLIP_MEAN),  # 4x4 patches; the class token dropped ("default")
    ("tiny_llava", {"feature_strategy": "full"}, 17, CLIP_MEAN),
    ("tiny_llava", {"kind": "perceiver", "num_latents": 5, "num_heads": 4}, 5, CLIP_MEAN),
    ("tiny_idefics3", {}, 4, SIGLIP_MEAN),  # pixel shuffle x2: 16 patches -> 4 tokens
    ("llava15_7b", {}, 576, CLIP_MEAN),
])
def test_input_spec_matches_what_the_model_returns(name, connector, tokens, mean):
    cfg = _model(name, **connector)
    spec = input_spec(cfg)
    assert (spec.layout, spec.image_size, spec.image_token_id) == ("unified", cfg.vit.image_size,
                                                                   cfg.image_token_index)
    assert spec.tokens_per_image == tokens and spec.image_mean == mean
    if name.startswith("tiny"):  # the connector's output, traced abstractly
        model = build_model(cfg)
        pixels = jnp.zeros((1, 2, 3, cfg.vit.image_size, cfg.vit.image_size))
        out = jax.eval_shape(lambda: model.init_with_output(
            jax.random.PRNGKey(0), pixels, method=lambda m, x: m.encode_images(x))[0])
        assert out.shape[:3] == (1, 2, tokens)


def test_connector_count_disagreeing_with_its_output_fails_at_trace(monkeypatch):
    cfg = _model("tiny_llava")
    monkeypatch.setattr(CONNECTORS.get("mlp"), "tokens_per_image", staticmethod(lambda c, t: t - 1))
    assert tokens_per_image(cfg) == 15
    with pytest.raises(ValueError, match="returns 16 tokens per image but tokens_per_image"):
        jax.eval_shape(lambda: init_params(build_model(cfg), jax.random.PRNGKey(0)))


def test_model_inputs_per_family_and_synthetic_batches():
    batch = {k: np.zeros(1) for k in ("input_ids", "pixel_values", "image_mask", "aspect_ratio_ids",
                                      "cross_attention_mask", "segment_ids", "positions", "loss_mask")}
    assert sorted(model_inputs(batch, _model("tiny_llava"))) == [
        "image_mask", "input_ids", "pixel_values", "positions", "segment_ids"]
    mllama = load_config(os.path.join(MODELS, "tiny_mllama.yaml")).model
    assert "image_mask" not in model_inputs(batch, mllama) and "cross_attention_mask" in model_inputs(batch, mllama)
    llava = _model("tiny_llava")
    shapes = dataclasses.replace(load_config().train.synthetic, seq_len=72, num_images=2)
    batch = get_family(llava).synthetic_batch(llava, shapes, 3, np.random.default_rng(0))
    np.testing.assert_array_equal((batch["input_ids"] == llava.image_token_index).sum(axis=1), 2 * 16)
    assert batch["pixel_values"].shape == (3, 2, 3, 28, 28) and batch["image_mask"].all()
    assert not batch["loss_mask"][batch["input_ids"] == llava.image_token_index].any()
    with pytest.raises(ConfigError, match=r"train.synthetic.seq_len \(64\) must be at least twice"):
        get_family(llava).synthetic_batch(llava, dataclasses.replace(shapes, seq_len=64), 3, np.random.default_rng(0))


def test_unified_flops_count_tower_connector_and_decoder():
    cfg = _model("llava15_7b")
    batch = dict(input_ids=np.zeros((1, 1024), np.int32), pixel_values=np.zeros((1, 1, 3, 336, 336), np.float32))
    f = {}
    for g in get_family(cfg).flops_groups(cfg, batch):
        f[g.name.split("/")[0]] = f.get(g.name.split("/")[0], 0.0) + g.forward
    assert list(f) == ["vision", "connector", "text"]
    assert f["connector"] == 2 * 576 * (1024 * 4096 + 4096 * 4096)  # linear_1, linear_2 on 576 patches
    assert 3.0e11 < f["vision"] < 4.5e11  # ~2 x 0.3B params x 577 tokens, plus attention
    assert 1.3e13 < f["text"] < 1.5e13  # ~2 x 6.7B params x 1024 tokens, plus attention
    # A frozen tower below a trainable connector: no gradient reaches it (1x); the rest train (3x).
    trainable = frozenset({"connector/projector/fc1/kernel", "text/embed_tokens/embedding",
                           *(f"text/decoder/layer_0/{m}/kernel" for m in ("self_attn/q_proj", "mlp/up_proj")),
                           "text/lm_head/kernel"})
    assert flops.train_flops(cfg, batch, trainable) == f["vision"] + 3 * (f["connector"] + f["text"])
    # Only the decoder trains: the connector below it costs one forward too; everything trains: 3x all.
    decoder = frozenset(p for p in trainable if p.startswith("text/"))
    assert flops.train_flops(cfg, batch, decoder) == f["vision"] + f["connector"] + 3 * f["text"]
    everything = frozenset({*trainable, "vision/patch_embedding/kernel", "vision/encoder/self_attn/q_proj/kernel",
                            "vision/encoder/mlp/fc1/kernel"})
    assert flops.train_flops(cfg, batch, everything) == 3 * sum(f.values())
    # Padded image slots (image_mask 0) are not billed to the tower or the connector.
    empty = dict(batch, image_mask=np.zeros((1, 1), np.int32))
    assert flops.train_flops(cfg, empty, everything) == 3 * f["text"]
