"""The same logits on 1 device and on 8 CPU devices under fsdp and fsdp x tensor rule presets."""

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from hf_models import mllama_batch
from vlm_jax import sharding
from vlm_jax.config import ConfigError, MeshConfig
from vlm_jax.convert import from_hf
from vlm_jax.models.vlm import abstract_params


def _batch8():
    parts = [mllama_batch(seed) for seed in range(3)]
    return {k: np.concatenate([p[k] for p in parts])[:8] for k in parts[0]}


@pytest.mark.parametrize("mesh_cfg,rules,up_proj_spec", [
    (MeshConfig(data=1, fsdp=8, tensor=1), "fsdp", P(None, "fsdp", None)),
    (MeshConfig(data=1, fsdp=4, tensor=2), "fsdp_tp", P(None, "fsdp", "tensor")),
    (MeshConfig(data=2, fsdp=-1, tensor=2), "fsdp_tp", P(None, "fsdp", "tensor")),
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
