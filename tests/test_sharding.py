"""The same logits on 1 device and on 8 CPU devices under fsdp and fsdp x tensor rule presets; the presets
resolve through their `base:` chains to the tables in tests/golden/mesh_rules.json."""

import json
import os
import re

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from hf_models import mllama_batch
from vlm_jax import sharding
from vlm_jax.config import ConfigError, MeshConfig, load_config
from vlm_jax.convert import from_hf
from vlm_jax.families import abstract_params, get_family
from vlm_jax.train.state import abstract_with_shardings
from train_helpers import ROOT

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "mesh_rules.json")
CONFIGS = os.path.join(ROOT, "configs", "models")
PRESETS = ("dp", "fsdp", "fsdp_tp", "fsdp_tp_vision_dp")


def _batch8():
    parts = [mllama_batch(seed) for seed in range(3)]
    return {k: np.concatenate([p[k] for p in parts])[:8] for k in parts[0]}


@pytest.mark.parametrize("mesh_cfg,rules,up_proj_spec", [
    (MeshConfig(data=1, fsdp=8, tensor=1), "fsdp", P(None, "fsdp", None)),
    (MeshConfig(data=1, fsdp=4, tensor=2), "fsdp_tp", P(None, "fsdp", "tensor")),
    (MeshConfig(data=2, fsdp=-1, tensor=2), "fsdp_tp", P(None, "fsdp", "tensor")),
    (MeshConfig(data=1, fsdp=4, tensor=2), "fsdp_tp_vision_dp", P(None, "fsdp", "tensor")),
])
def test_sharded_logits_equal_single_device(hf_mllama_dir, mesh_cfg, rules, up_proj_spec):
    assert jax.device_count() == 8
    model, params = from_hf(hf_mllama_dir[1], dtype="float32")
    batch = _batch8()
    single = np.asarray(jax.jit(lambda p, b: model.apply({"params": p}, **b))(params, batch))

    mesh, rule_table = sharding.make_mesh(mesh_cfg), sharding.load_rules(rules)
    placed = jax.device_put(params, sharding.param_shardings(abstract_params(model), mesh, rule_table))
    sharded_batch = sharding.shard_batch(batch, mesh, rule_table)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rule_table):
        logits = jax.jit(lambda p, b: model.apply({"params": p}, **b))(placed, sharded_batch)
    up_proj = placed["text"]["decoder"]["layer_0"]["mlp"]["up_proj"]["kernel"]
    assert up_proj.sharding.spec == up_proj_spec
    assert len(up_proj.addressable_shards) == 8 and up_proj.addressable_shards[0].data.size < up_proj.size
    assert logits.sharding.spec[0] in (("data", "fsdp"), "fsdp")
    np.testing.assert_allclose(np.asarray(logits), single, atol=2e-5, rtol=1e-5)


def _compiled_image_encoder(model_yaml: str, rules_name: str, image_keys: tuple[str, ...]):
    """Compiles the model's image encoding of 8 images on fsdp 4 x tensor 2; returns the count of each collective
    in it and the images (x tiles) one device's patch embedding sees."""
    cfg = load_config(os.path.join(CONFIGS, model_yaml), [])
    family = get_family(cfg.model)
    model = family.build(cfg.model)
    images = {k: v for k, v in family.example_inputs(cfg.model, batch=8).items() if k in image_keys}
    mesh, rules = sharding.make_mesh(MeshConfig(data=1, fsdp=4, tensor=2)), sharding.load_rules(rules_name)
    boxed = abstract_params(model)
    params = abstract_with_shardings(nn.meta.unbox(boxed), sharding.param_shardings(boxed, mesh, rules))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        encode = jax.jit(lambda p, b: model.apply({"params": p}, **b, method="encode_images"))
        hlo = encode.lower(params, sharding.shard_batch(images, mesh, rules)).compile().as_text()
    counts = {op: len(re.findall(rf"= \S+ {op}(-start)?\(", hlo))
              for op in ("all-reduce", "reduce-scatter", "collective-permute", "all-gather")}
    patch_rows = {int(r) for r in re.findall(r"= \w+\[(\d+),\S* convolution\(", hlo)}
    assert len(patch_rows) == 1, patch_rows
    return counts, patch_rows.pop()


@pytest.mark.parametrize("model_yaml,image_keys,images", [
    ("tiny_mllama.yaml", ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask"), 8 * 4),  # 4 tiles each
    ("tiny_llava.yaml", ("pixel_values",), 8),
])
def test_vision_towers_run_data_parallel_over_tensor(model_yaml, image_keys, images):
    """Under fsdp_tp the vision towers split their heads over `tensor` (an all-reduce per layer) and each
    device encodes a quarter of the images (batch over fsdp 4); under fsdp_tp_vision_dp each device encodes an
    eighth with gathered weights, and nothing is reduced."""
    tensor_parallel, tp_rows = _compiled_image_encoder(model_yaml, "fsdp_tp", image_keys)
    data_parallel, dp_rows = _compiled_image_encoder(model_yaml, "fsdp_tp_vision_dp", image_keys)
    assert (tp_rows, dp_rows) == (images // 4, images // 8)
    assert tensor_parallel["all-reduce"] + tensor_parallel["reduce-scatter"] > 0
    assert data_parallel["all-reduce"] == data_parallel["reduce-scatter"] == data_parallel["collective-permute"] == 0
    assert data_parallel["all-gather"] > 0  # the weights, gathered over (fsdp, tensor)


def test_indivisible_axis_is_a_clear_error(hf_mllama_dir):
    model, _ = from_hf(hf_mllama_dir[1], dtype="float32")
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=2, tensor=4))
    with pytest.raises(ConfigError, match="kv_heads.*not divisible by mesh axes tensor"):
        sharding.param_shardings(abstract_params(model), mesh, sharding.load_rules("fsdp_tp"))


def test_mesh_sizes_must_multiply_to_device_count():
    with pytest.raises(ConfigError, match="multiply to 6, but there are 8 devices"):
        sharding.make_mesh(MeshConfig(data=3, fsdp=2, tensor=1))


def test_sharding_table_lists_every_parameter(hf_mllama_dir):
    model, _ = from_hf(hf_mllama_dir[1], dtype="float32")
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    table = sharding.sharding_table(abstract_params(model), mesh, sharding.load_rules("fsdp_tp"))
    line = next(l for l in table.splitlines() if l.startswith("text/decoder/layer_0/mlp/up_proj/kernel"))
    assert "('layers', 'embed', 'mlp')" in line and "(None, 'fsdp', 'tensor')" in line and "8,192" in line  # 2*64*128*4 bytes / 8


def _json(axes):
    return list(axes) if isinstance(axes, tuple) else axes


def rules_summary(rules) -> dict:
    """What flax makes of a rule table: each logical name's mesh axes and, per mesh axis, the order in which
    names claim it (within one array the first claimant gets the axis). Equal summaries shard every array
    alike. Regenerate the golden file with
    `python -c "import json, test_sharding as t; print(json.dumps(t.golden_tables(), indent=1))"` from tests/."""
    names = sorted(n for n, _ in sharding.load_rules("base"))
    return {"axes": {n: _json(nn.logical_to_mesh_axes((n,), rules)[0]) for n in names},
            "claim_order": {ax: [n for n, a in rules if ax in ((a,) if isinstance(a, str) else a or ())]
                            for ax in sharding.MESH_AXES}}


def golden_tables() -> dict:
    return {p: rules_summary(sharding.load_rules(p)) for p in PRESETS}


def test_presets_resolve_to_the_golden_tables():
    with open(GOLDEN) as f:
        assert golden_tables() == json.load(f)
    base = sorted(n for n, _ in sharding.load_rules("base"))
    for preset in PRESETS:  # every preset names every logical axis, once
        assert sorted(n for n, _ in sharding.load_rules(preset)) == base


def test_user_table_amends_a_preset(tmp_path):
    (tmp_path / "mine.yaml").write_text("base: fsdp\nvocab: tensor\n")
    rules = sharding.load_rules(str(tmp_path / "mine.yaml"))
    assert rules[0] == ("vocab", "tensor")
    assert dict(rules) == {**dict(sharding.load_rules("fsdp")), "vocab": "tensor"}


def test_user_table_base_is_relative_to_the_file(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "mine.yaml").write_text("base: fsdp_tp\nvision_embed: null\n")
    (tmp_path / "sub" / "top.yaml").write_text("base: ../mine.yaml\nmlp: null\n")
    rules = dict(sharding.load_rules(str(tmp_path / "sub" / "top.yaml")))
    assert rules["vision_embed"] is None and rules["mlp"] is None and rules["heads"] == "tensor"


@pytest.mark.parametrize("files,match", [
    ({"a.yaml": "base: b.yaml\n", "b.yaml": "base: ./a.yaml\n"}, r"`base:` cycle .*a.yaml -> .*b.yaml -> .*a.yaml"),
    ({"a.yaml": "base: nope\n"}, r"base 'nope' in .*a.yaml is neither a preset \(base, dp, fsdp, fsdp_tp, fsdp_tp_vision_dp\)"),
    ({"a.yaml": "base: fsdp\nemebd: tensor\n"}, r"'emebd' is no logical axis of base 'fsdp'"),
])
def test_bad_base_is_a_one_line_error(tmp_path, files, match):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError, match=match):
        sharding.load_rules(str(tmp_path / "a.yaml"))
