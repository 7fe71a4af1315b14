"""LLaVA (CLIP / SigLIP towers) and Idefics3 against transformers (fp32, tiny random models), two-way
conversion, and parameter counts of the published shapes."""
import json
import os

import jax
import numpy as np
import pytest
import torch

from hf_models import assert_same_tensors, IMAGE_TOKEN, tiny_idefics3, tiny_llava, unified_batch
from vlm_jax import cli
from vlm_jax.convert import from_hf, to_hf
from vlm_jax.convert.keymap import flatten
from vlm_jax.convert.safetensors_io import read_dir, write_dir

BUILDERS = {
    "llava_clip": lambda: tiny_llava("clip"),  # vision_feature_layer -2, "default" (CLS dropped): 16 tokens
    "llava_siglip": lambda: tiny_llava("siglip", vision_feature_layer=[-2, -1],
                                       vision_feature_select_strategy="full"),  # 16 tokens, 2 layers concatenated
    "idefics3": tiny_idefics3,  # 4x4 patches, pixel shuffle x2: 4 tokens
}
TOKENS = {"llava_clip": 16, "llava_siglip": 16, "idefics3": 4}


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    out = {}
    for name, build in BUILDERS.items():
        model = build()
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        out[name] = (model, str(path))
    return out


def _idefics3_batch():
    """Row 0: a full image and one whose bottom/right is padding; row 1: one narrow image and an all-zero
    padding slot, which must be dropped."""
    batch = unified_batch(TOKENS["idefics3"], images_per_row=(2, 1))
    mask = np.zeros((2, 2, 28, 28), bool)
    mask[0, 0] = True
    mask[0, 1, :20, :13] = True
    mask[1, 0, :, :9] = True
    batch["pixel_values"] = batch["pixel_values"] * mask[:, :, None]
    batch["pixel_attention_mask"] = mask
    return batch


def _hf_logits(name, hf_model, batch):
    with torch.no_grad():
        if name == "idefics3":
            return hf_model(**{k: torch.from_numpy(v) for k, v in batch.items()}).logits.numpy()
        real = batch["pixel_values"].reshape(-1, *batch["pixel_values"].shape[2:])
        real = real[np.abs(real).reshape(len(real), -1).sum(-1) > 0]  # LLaVA takes a flat list of real images
        return hf_model(input_ids=torch.from_numpy(batch["input_ids"]), pixel_values=torch.from_numpy(real)).logits.numpy()


@pytest.mark.parametrize("name", list(BUILDERS))
def test_logits_match_transformers(hf_dirs, name):
    hf_model, path = hf_dirs[name]
    model, params = from_hf(path, dtype="float32")
    batch = _idefics3_batch() if name == "idefics3" else unified_batch(TOKENS[name], images_per_row=(2, 1))
    ref = _hf_logits(name, hf_model, batch)
    ours = np.asarray(jax.jit(model.apply)({"params": params}, **batch))
    assert ours.shape == ref.shape == (2, 40, 128)
    err = np.abs(ours - ref).max()
    print(f"{name}: max |logits - transformers| = {err:.2e}")
    assert err <= 1e-4
    # The images really matter: without them the image-token rows differ.
    text_only = np.asarray(model.apply({"params": params}, batch["input_ids"]))
    assert np.abs(text_only - ref).max() > 1e-2


def test_idefics3_pixel_mask_matters(hf_dirs):
    """Bucketed positions and masked patches: dropping the pixel mask changes the logits of the padded images."""
    _, path = hf_dirs["idefics3"]
    model, params = from_hf(path, dtype="float32")
    batch = _idefics3_batch()
    with_mask = np.asarray(model.apply({"params": params}, **batch))
    without = np.asarray(model.apply({"params": params}, batch["input_ids"], batch["pixel_values"]))
    assert np.abs(with_mask - without).max() > 1e-3


@pytest.mark.parametrize("name", list(BUILDERS))
def test_hf_to_ours_to_hf_is_bitwise(hf_dirs, name, tmp_path):
    _, path = hf_dirs[name]
    model, params = from_hf(path)
    to_hf(model, params, str(tmp_path))
    original, exported = read_dir(path), read_dir(str(tmp_path))
    if name.startswith("llava"):  # 5.23 saves `vision_tower.*`; we export the 4.x `vision_tower.vision_model.*`
        assert all(k.startswith("vision_tower.embeddings") is False for k in exported)
        original = {k.replace("vision_tower.", "vision_tower.vision_model.", 1): v for k, v in original.items()}
        assert any(k.startswith("vision_tower.vision_model.head.") for k in exported) == (name == "llava_siglip")
    assert_same_tensors(original, exported)


@pytest.mark.parametrize("name", ["llava_clip", "idefics3"])
def test_ours_to_hf_to_ours_is_bitwise(hf_dirs, name, tmp_path):
    _, path = hf_dirs[name]
    for scan in (True, False):
        model, params = from_hf(path, scan_layers=scan)
        to_hf(model, params, str(tmp_path / str(scan)))
        again_model, again = from_hf(str(tmp_path / str(scan)), scan_layers=scan)
        assert again_model.config == model.config
        a, b = flatten(params), flatten(again)
        assert sorted(a) == sorted(b)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_llava_export_loads_in_transformers(hf_dirs, tmp_path):
    from transformers import LlavaForConditionalGeneration
    hf_model, path = hf_dirs["llava_siglip"]
    model, params = from_hf(path, dtype="float32")
    to_hf(model, params, str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["vision_feature_layer"] == [-2, -1] and "rope_parameters" not in config["text_config"]
    reloaded = LlavaForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
    batch = unified_batch(16, images_per_row=(2, 1))
    np.testing.assert_array_equal(_hf_logits("llava", reloaded, batch), _hf_logits("llava", hf_model, batch))


def test_llava_imports_in_memory_layout(hf_dirs, tmp_path):
    hf_model, path = hf_dirs["llava_clip"]
    state = {k: v.numpy() for k, v in hf_model.state_dict().items()}
    assert any(k.startswith("model.vision_tower.") for k in state) and "lm_head.weight" in state
    write_dir(str(tmp_path), state)
    (tmp_path / "config.json").write_text(open(os.path.join(path, "config.json")).read())
    _, from_memory = from_hf(str(tmp_path))
    _, from_disk = from_hf(path)
    for key, value in flatten(from_disk).items():
        np.testing.assert_array_equal(flatten(from_memory)[key], value)


@pytest.mark.parametrize("name,expected", [("llava15_7b", 7_063_427_072), ("idefics3_8b", 8_462_086_384)])
def test_info_counts_equal_transformers_meta_model(name, expected, capsys):
    import transformers
    from vlm_jax.config import load_config
    from vlm_jax.convert import family_module
    cfg = load_config(f"configs/models/{name}.yaml").model
    hf = family_module(cfg).config_to_hf(cfg, "bfloat16")
    config_cls = transformers.AutoConfig.for_model(**hf).__class__
    model_cls = getattr(transformers, hf["architectures"][0])
    with torch.device("meta"):
        meta_model = model_cls(config_cls.from_dict(hf))
    hf_total = sum(p.numel() for p in meta_model.parameters())
    assert hf_total == expected
    assert cli.main(["info", "--config", f"configs/models/{name}.yaml"]) == 0
    total_line = [l for l in capsys.readouterr().out.splitlines() if l.startswith("total")][0]
    assert int(total_line.split()[-1].replace(",", "")) == hf_total


def test_image_token_count_mismatch_is_one_line_error():
    from vlm_jax.config import load_config
    from vlm_jax.data.bad_records import BadRecord
    from vlm_jax.data.spec import check_image_tokens
    from vlm_jax.families import input_spec
    from vlm_jax.models.unified import tokens_per_image
    cfg = load_config("configs/models/tiny_llava.yaml").model
    assert tokens_per_image(cfg) == 16
    ids = np.full((1, 40), 5)
    ids[0, 2:18] = IMAGE_TOKEN - 1
    check_image_tokens(ids, 1, input_spec(cfg))
    with pytest.raises(BadRecord, match=r"^image_count_mismatch: 16 <image> tokens but 2 images x 16") as e:
        check_image_tokens(ids, 2, input_spec(cfg))
    assert "\n" not in str(e.value)
