"""The FLOPs model behind MFU against XLA's own count of the compiled train step (`cost_analysis()`), for one
model of each kind of family at widths of a few hundred (unscanned, so XLA counts every layer; matmuls
dominate there as they do at real size), every image tile present. XLA also counts elementwise work, the
optimizer update and the loss chunks' rematerialised logits, which MFU leaves out, so ours is a few percent
lower. A frozen vision tower (or frozen text MLPs) must change both counts alike: per parameter group, 1x forward
for a frozen group nothing trainable feeds, 2x for a frozen one gradients pass through, 3x for a trainable one."""
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from vlm_jax.config import load_config
from vlm_jax.objectives import REFERENCE_LOGPS
from vlm_jax.train import flops
from vlm_jax.train.loop import Trainer
from vlm_jax.train.step import batch_shardings, make_reference_step, make_train_step

from train_helpers import ROOT

RUN = ["model.scan_layers=false", "train.steps=1", "train.synthetic.enabled=true", "train.log.tensorboard=false"]
MLLAMA = ["train.batch_size=2", "train.synthetic.seq_len=256", "model.text.hidden_size=512",
          "model.text.intermediate_size=1536", "model.text.num_heads=8", "model.text.num_kv_heads=4",
          "model.text.vocab_size=1024", "model.image_token_index=1024", "model.vision.hidden_size=384",
          "model.vision.intermediate_size=1536", "model.vision.num_heads=8", "model.vision.image_size=56",
          "model.vision.patch_size=14", "train.synthetic.num_tiles=4"]
CASES = {
    "tiny_mllama": ("tiny_mllama", MLLAMA),
    "tiny_mllama_frozen_vision": ("tiny_mllama", [*MLLAMA, "train.frozen=[vision/.*]"]),
    "tiny_mllama_frozen_text_mlps": ("tiny_mllama", [*MLLAMA, "train.frozen=[text/decoder/.*/mlp/.*]"]),
    "tiny_llava": ("tiny_llava", [
        "train.batch_size=2", "train.synthetic.seq_len=160", "model.text.hidden_size=256",
        "model.text.intermediate_size=1024", "model.vit.hidden_size=256", "model.vit.intermediate_size=1024",
        "model.text.vocab_size=512", "model.image_token_index=511", "model.vit.image_size=112",
        "model.vit.patch_size=14"]),
    "tiny_clip": ("tiny_clip", [
        "train.batch_size=8", "train.synthetic.seq_len=64", "model.text_encoder.hidden_size=256",
        "model.text_encoder.intermediate_size=1024", "model.text_encoder.max_position_embeddings=64",
        "model.vit.hidden_size=256", "model.vit.intermediate_size=1024", "model.vit.image_size=112",
        "model.vit.patch_size=14"]),
}


def _trainer(name, tmp_path, extra=()):
    config, overrides = CASES[name]
    cfg = load_config(f"{ROOT}/configs/models/{config}.yaml", [f"workdir={tmp_path}", *RUN, *overrides, *extra])
    return Trainer(cfg, devices=jax.devices()[:1], echo=lambda *_: None)


@pytest.mark.parametrize("name", sorted(CASES))
def test_flops_model_agrees_with_xla_cost_analysis(name, tmp_path):
    trainer = _trainer(name, tmp_path)
    cfg, plan = trainer.cfg, trainer.plan(trainer.stages[0])
    example = trainer.data.example_batch(0)
    step = make_train_step(trainer.model, cfg.train, trainer.stages[0], plan.tx, plan.trainable, plan.shardings,
                           batch_shardings(example, trainer.mesh, trainer.rules), trainer.mesh, trainer.rules)
    cost = step.lower(trainer.fresh_state(), trainer.place(example)).compile().cost_analysis()
    xla = (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]
    ours = flops.train_flops(cfg.model, example, plan.trainable)
    assert ours == flops.train_flops(cfg.model, example, plan.trainable, padded=True)  # every tile is present
    assert 0.95 < ours / xla < 1.05, (name, ours, xla)


def test_frozen_groups_and_absent_tiles_change_the_count(tmp_path):
    trainer = _trainer("tiny_mllama", tmp_path)
    m, example = trainer.cfg.model, trainer.data.example_batch(0)
    params = trainer.plan(trainer.stages[0]).trainable
    everything = flops.train_flops(m, example, params)
    without = {name: flops.train_flops(m, example, frozenset(p for p in params if not p.startswith(prefix)))
               for name, prefix in [("global", "vision/global_transformer/"), ("vision", "vision/")]}
    # Freezing the global layers saves their weight gradients only (the local layers below still train).
    assert without["vision"] < without["global"] < everything
    half = dict(example, aspect_ratio_mask=np.asarray(example["aspect_ratio_mask"]).copy())
    half["aspect_ratio_mask"][:, :, 2:] = 0  # 2 of 4 tiles present
    assert flops.train_flops(m, half, params) < everything
    padded_slots = dict(example, aspect_ratio_ids=np.zeros_like(example["aspect_ratio_ids"]))  # no image at all
    assert flops.train_flops(m, padded_slots, params) < flops.train_flops(m, half, params)
    assert flops.train_flops(m, half, params, padded=True) == everything


def test_a_dpo_stage_adds_one_forward_of_its_reference(tmp_path):
    """DPO scores every batch under its frozen reference (a program of its own): its forward FLOPs, as XLA counts
    that program, are what `reference=True` adds to the step's."""
    trainer = _trainer("tiny_mllama", tmp_path)
    cfg, stage = trainer.cfg, trainer.stages[0]
    plan, example = trainer.plan(stage), trainer.data.example_batch(0)
    params = trainer.fresh_state().params
    step = make_reference_step(trainer.model, cfg.train, stage, plan.shardings.params,
                               {**batch_shardings(example, trainer.mesh, trainer.rules),
                                REFERENCE_LOGPS: NamedSharding(trainer.mesh, P())},
                               trainer.mesh, trainer.rules)
    cost = step.lower(params, trainer.place(example)).compile().cost_analysis()
    xla = (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]
    added = (flops.train_flops(cfg.model, example, plan.trainable, reference=True)
             - flops.train_flops(cfg.model, example, plan.trainable))
    assert 0.95 < added / xla < 1.05, (added, xla)
