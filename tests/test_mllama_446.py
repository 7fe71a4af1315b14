"""Against transformers 4.46.3, which reads Mllama's vision_config.intermediate_layers_indices as Meta's reference
does (index i = the state entering local layer i), the convention every Llama 3.2 Vision checkpoint was trained
with: a tiny model 4.46.3 saved and its logits (tests/fixtures/make_mllama_446_reference.py). Runs with
transformers 5.23, which reads the same field as layer i's output."""
import json
import os

import numpy as np
import pytest
import torch

from hf_models import assert_same_tensors, torch_inputs
from vlm_jax.convert import from_hf, to_hf
from vlm_jax.convert.safetensors_io import read_dir

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "mllama_446")


def _logits(model, params, batch):
    return np.asarray(model.apply({"params": params}, **batch))


@pytest.fixture(scope="module")
def imported():
    """(model, params, the fixture's inputs, 4.46.3's logits, our logits)."""
    ref = np.load(os.path.join(FIXTURE, "reference.npz"))
    batch = {k: ref[k] for k in ref.files if k != "logits"}
    model, params = from_hf(FIXTURE, dtype="float32")
    return model, params, batch, ref["logits"], _logits(model, params, batch)


def _transformers_logits(path, batch):
    from transformers import MllamaForConditionalGeneration
    with torch.no_grad():
        return MllamaForConditionalGeneration.from_pretrained(path).eval()(**torch_inputs(batch)).logits.numpy()


def test_import_computes_what_446_computes(imported):
    model, params, batch, ref, ours = imported
    assert model.config.vision.intermediate_layers_convention == "input"
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    # The fixture tells the conventions apart: its indices read as layer outputs give another model.
    as_outputs, _ = from_hf(FIXTURE, dtype="float32", vision={"intermediate_layers_convention": "output"})
    assert np.abs(_logits(as_outputs, params, batch) - ref).max() > 0.1


def test_export_for_4x_reads_back_as_the_same_model(imported, tmp_path):
    model, params, batch, _, ours = imported
    to_hf(model, params, str(tmp_path), vision_layer_convention="input")
    vision = json.loads((tmp_path / "config.json").read_text())["vision_config"]
    assert vision["intermediate_layers_indices"] == [1, 3]  # what 4.46.3 wrote, as it reads them
    assert_same_tensors(read_dir(FIXTURE), read_dir(str(tmp_path)))
    again, again_params = from_hf(str(tmp_path), dtype="float32")
    assert again.config == model.config
    np.testing.assert_array_equal(_logits(again, again_params, batch), ours)


def test_export_for_5x_makes_transformers_523_compute_the_446_model(imported, tmp_path):
    model, params, batch, ref, ours = imported
    to_hf(model, params, str(tmp_path))  # the default: for transformers 5.x
    assert json.loads((tmp_path / "config.json").read_text())["vision_config"]["intermediate_layers_indices"] == [0, 2]
    exported = _transformers_logits(str(tmp_path), batch)
    np.testing.assert_allclose(exported, ref, atol=1e-4, rtol=0)
    np.testing.assert_allclose(exported, ours, atol=1e-4, rtol=0)
    # 5.23 loading the 4.46.3 directory as it is computes another model: why the export translates.
    assert np.abs(_transformers_logits(FIXTURE, batch) - ref).max() > 0.1
