"""Typed configs: YAML with `base:`, dotted overrides, one-line errors naming the key."""
import os

import pytest

from vlm_jax.config import ConfigError, load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs/models/tiny_mllama.yaml")


def test_loads_presets_with_types():
    cfg = load_config(os.path.join(REPO, "configs/models/llama32_11b_vision.yaml"))
    assert cfg.model.text.cross_attention_layers == (3, 8, 13, 18, 23, 28, 33, 38)
    assert cfg.model.vision.supported_aspect_ratios[1] == (1, 2)
    assert cfg.model.vision.output_dim == 7680 and cfg.model.vision.padded_num_patches == 1608
    assert cfg.model.text.is_periodic and cfg.model.text.scan_period == 5


def test_dotted_overrides_and_base(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text(f"base: {TINY}\nmodel:\n  text: {{num_layers: 8, cross_attention_layers: [1, 3, 5, 7]}}\n")
    cfg = load_config(str(child), ["model.dtype=bfloat16", "mesh.tensor=2", "model.vision.norm_eps=1e-6"])
    assert cfg.model.text.num_layers == 8 and cfg.model.text.hidden_size == 64  # inherited
    assert cfg.model.dtype == "bfloat16" and cfg.mesh.tensor == 2 and cfg.model.vision.norm_eps == 1e-6


def test_overrides_index_lists():
    recipe = os.path.join(REPO, "configs/recipes/tiny_llama3v_synthetic.yaml")
    cfg = load_config(recipe, ["train.stages.1.steps=7", "train.stages.0.lr_groups.1.learning_rate=0.5"])
    assert [s.steps for s in cfg.train.stages] == [6, 7, 4]
    assert [g.learning_rate for g in cfg.train.stages[0].lr_groups] == [2.0e-3, 0.5]
    for override in ("train.stages.3.steps=1", "train.stages.first.steps=1"):
        with pytest.raises(ConfigError, match=f"override '{override}': 'train.stages' is a list of 3; '(3|first)' is "
                                              "not an index into it"):
            load_config(recipe, [override])


@pytest.mark.parametrize("override,needle", [
    ("model.text.hidden_sise=3", "unknown config key 'model.text.hidden_sise'"),
    ("model.text.num_layers=four", "model.text.num_layers: expected an integer"),
    ("model.text.num_heads=5", "model.text.num_heads (5) must divide model.text.hidden_size (64)"),
    ("model.text.num_kv_heads=3", "num_kv_heads (3) must divide"),
    ("model.text.cross_attention_layers=[1,4]", "cross_attention_layers: 4 is out of range"),
    ("model.text.cross_attention_layers=[0,3]", "not evenly spaced"),
    ("model.vision.intermediate_layers_indices=[9]", "intermediate_layers_indices: 9 is out of range"),
    ("model.dtype=float8", "model.dtype: 'float8' is not one of"),
    ("model.vision_remat_policy=most", "model.vision_remat_policy: 'most' is not one of"),
    ("model.scan_layers=maybe", "expected true/false"),
    ("mesh.fsdp=0", "mesh.fsdp must be positive or -1"),
])
def test_errors_name_the_key(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, [override])
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_unscanned_irregular_layers_are_allowed():
    cfg = load_config(TINY, ["model.text.cross_attention_layers=[0,3]", "model.scan_layers=false"])
    assert cfg.model.text.cross_attention_layers == (0, 3)


def test_missing_file():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("/nonexistent.yaml")
