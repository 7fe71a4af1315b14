"""Two-way conversion with Hugging Face: bitwise round trips, config forms, layouts, sharding of files."""
import json
import os

import numpy as np
import pytest
import torch

from hf_models import assert_same_tensors, mllama_batch, torch_inputs
from vlm_jax import cli
from vlm_jax.convert import from_hf, to_hf
from vlm_jax.convert.keymap import flatten
from vlm_jax.convert.mllama import LAYER_CONVENTION_KEY
from vlm_jax.convert.safetensors_io import read_dir, write_dir


def _hf_config(path):
    """The config as transformers reads it, less bookkeeping and our vision layer convention marker."""
    from transformers import MllamaConfig
    d = MllamaConfig.from_pretrained(path).to_dict()
    for key in ("transformers_version", "_name_or_path", "architectures", "dtype", "torch_dtype"):
        d.pop(key, None)
    for sub in ("text_config", "vision_config"):
        for key in ("transformers_version", "_name_or_path", "dtype", "torch_dtype", LAYER_CONVENTION_KEY):
            d[sub].pop(key, None)
    return d


def _vision_indices(path):
    vision = json.loads(open(os.path.join(path, "config.json")).read())["vision_config"]
    return vision["intermediate_layers_indices"], vision.get(LAYER_CONVENTION_KEY)


def test_hf_to_ours_to_hf_is_bitwise(hf_mllama_dir, tmp_path):
    """Exported for Meta's convention, an official-style checkpoint comes back as it was (plus the marker)."""
    hf_model, path = hf_mllama_dir
    model, params = from_hf(path)
    to_hf(model, params, str(tmp_path), vision_layer_convention="input")
    assert_same_tensors(read_dir(path), read_dir(str(tmp_path)))
    assert _hf_config(path) == _hf_config(str(tmp_path))
    assert _vision_indices(str(tmp_path)) == ([1, 3], "input")


def test_exported_dir_loads_in_transformers_and_matches(hf_mllama_dir, tmp_path):
    from transformers import MllamaForConditionalGeneration
    hf_model, path = hf_mllama_dir
    model, params = from_hf(path, dtype="float32")
    to_hf(model, params, str(tmp_path), max_shard_bytes=60_000)  # force several shards + index
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 1
    config = json.loads((tmp_path / "config.json").read_text())
    assert "rope_scaling" in config["text_config"] and "rope_parameters" not in config["text_config"]
    # By default the indices are written for transformers 5.x: Meta's [1, 3] as layer outputs [0, 2].
    assert _vision_indices(str(tmp_path)) == ([0, 2], "output")
    reloaded = MllamaForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
    batch = torch_inputs(mllama_batch())
    with torch.no_grad():
        np.testing.assert_array_equal(reloaded(**batch).logits.numpy(), hf_model(**batch).logits.numpy())


def test_ours_to_hf_to_ours_is_bitwise(hf_mllama_dir, tmp_path):
    _, path = hf_mllama_dir
    for scan in (True, False):
        model, params = from_hf(path, scan_layers=scan)
        out = tmp_path / f"scan_{scan}"
        to_hf(model, params, str(out))
        _, again = from_hf(str(out), scan_layers=scan)
        a, b = flatten(params), flatten(again)
        assert sorted(a) == sorted(b)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_reads_5x_rope_parameters_and_4x_rope_scaling(hf_mllama_dir, tmp_path):
    """save_pretrained in 5.x writes rope_parameters; our export writes 4.x rope_scaling; both import alike."""
    _, path = hf_mllama_dir
    text_5x = json.loads(open(os.path.join(path, "config.json")).read())["text_config"]
    assert "rope_parameters" in text_5x
    model_5x, _ = from_hf(path)
    to_hf(model_5x, from_hf(path)[1], str(tmp_path), vision_layer_convention="input")
    model_4x, _ = from_hf(str(tmp_path))
    assert model_4x.config == model_5x.config
    assert model_5x.config.text.rope_scaling.original_max_position_embeddings == 64


def test_reads_in_memory_model_prefixed_layout(hf_mllama_dir, tmp_path):
    """transformers >= 4.53 keeps `model.`-prefixed names in memory; a state_dict saved as-is imports too."""
    hf_model, path = hf_mllama_dir
    state = {k: v.numpy() for k, v in hf_model.state_dict().items()}
    assert any(k.startswith("model.language_model.") for k in state)
    write_dir(str(tmp_path), state)
    with open(tmp_path / "config.json", "w") as f:
        f.write(open(os.path.join(path, "config.json")).read())
    _, from_memory_layout = from_hf(str(tmp_path))
    _, from_disk_layout = from_hf(path)
    for key, value in flatten(from_disk_layout).items():
        np.testing.assert_array_equal(flatten(from_memory_layout)[key], value)


def test_bfloat16_round_trip_is_bitwise(hf_mllama_dir, tmp_path):
    from transformers import MllamaForConditionalGeneration
    hf_model, _ = hf_mllama_dir
    bf16_dir = tmp_path / "bf16"
    MllamaForConditionalGeneration(hf_model.config).to(torch.bfloat16).save_pretrained(bf16_dir)
    model, params = from_hf(str(bf16_dir))
    to_hf(model, params, str(tmp_path / "out"), dtype="bfloat16", vision_layer_convention="input")
    original = read_dir(str(bf16_dir))
    assert all(str(v.dtype) == "bfloat16" for v in original.values())
    assert_same_tensors(original, read_dir(str(tmp_path / "out")))


def test_cli_import_export_round_trip(hf_mllama_dir, tmp_path, capsys):
    _, path = hf_mllama_dir
    ckpt, out, out_5x = str(tmp_path / "ckpt"), str(tmp_path / "hf"), str(tmp_path / "hf_5x")
    assert cli.main(["import", "--hf", path, "--out", ckpt]) == 0
    assert "[1, 3] read in the 'input' convention" in capsys.readouterr().out
    assert cli.main(["export", "--checkpoint", ckpt, "--to", "hf", "--out", out,
                     "--vision-layer-convention", "input"]) == 0
    assert "[1, 3] written in the 'input' convention" in capsys.readouterr().out
    assert_same_tensors(read_dir(path), read_dir(out))
    assert _hf_config(path) == _hf_config(out)
    assert cli.main(["export", "--checkpoint", ckpt, "--to", "hf", "--out", out_5x]) == 0
    assert "[0, 2] written in the 'output' convention" in capsys.readouterr().out
    assert _vision_indices(out_5x) == ([0, 2], "output")


def test_import_reads_the_marker_and_set_overrides_it(hf_mllama_dir, tmp_path, capsys):
    """Our export's marker says how to read its indices; without one Meta's convention is assumed; --set wins."""
    _, path = hf_mllama_dir
    model, params = from_hf(path)
    to_hf(model, params, str(tmp_path / "5x"))
    again, _ = from_hf(str(tmp_path / "5x"))
    assert (again.config.vision.intermediate_layers_indices, again.config.vision.intermediate_layers_convention) == (
        (0, 2), "output")
    ckpt = str(tmp_path / "ckpt")
    assert cli.main(["import", "--hf", path, "--out", ckpt, "--set",
                     "vision.intermediate_layers_convention=output", "dtype=bfloat16"]) == 0
    assert "[1, 3] read in the 'output' convention" in capsys.readouterr().out
    from vlm_jax.train import checkpoint
    config = checkpoint.read_meta(ckpt)[0].model
    assert (config.vision.intermediate_layers_convention, config.vision.intermediate_layers_indices,
            config.dtype) == ("output", (1, 3), "bfloat16")


def test_export_refuses_indices_the_target_convention_cannot_name(hf_mllama_dir, tmp_path, capsys):
    """Input index 0 (the embeddings entering layer 0) has no output index: one line, exit 2, nothing written."""
    _, path = hf_mllama_dir
    ckpt, out = str(tmp_path / "ckpt"), tmp_path / "hf"
    assert cli.main(["import", "--hf", path, "--out", ckpt, "--set", "vision.intermediate_layers_indices=[0,3]"]) == 0
    capsys.readouterr()
    assert cli.main(["export", "--checkpoint", ckpt, "--to", "hf", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "0 (the embeddings entering local layer 0) has no index in the 'output'" in err
    assert not out.exists() or not any(out.iterdir())
    assert cli.main(["export", "--checkpoint", ckpt, "--to", "hf", "--out", str(out),
                     "--vision-layer-convention", "input"]) == 0
    assert _vision_indices(str(out)) == ([0, 3], "input")


def test_layer_indices_translate_both_ways():
    from vlm_jax.config import load_model_config
    from vlm_jax.convert.mllama import layer_indices_in
    from vlm_jax.errors import ConversionError
    v = load_model_config({"family": "mllama", "vision": {"num_layers": 8, "intermediate_layers_indices": [1, 7],
                                                          "intermediate_layers_convention": "output"}}).vision
    assert layer_indices_in(v, "output") == (1, 7)
    with pytest.raises(ConversionError, match="7 \\(the last local layer's output\\) has no index in the 'input'"):
        layer_indices_in(v, "input")
    v = load_model_config({"family": "mllama",
                           "vision": {"num_layers": 8, "intermediate_layers_indices": [3, 7]}}).vision
    assert layer_indices_in(v, "output") == (2, 6)


@pytest.mark.parametrize("name,expected_hf", [("llama32_11b_vision", 10_670_220_835),
                                              ("llama32_90b_vision", 88_593_355_323)])
def test_info_counts_equal_transformers_meta_model(name, expected_hf, capsys):
    from transformers import MllamaConfig, MllamaForConditionalGeneration
    from vlm_jax.config import load_config
    from vlm_jax.convert.mllama import config_to_hf
    cfg = load_config(f"configs/models/{name}.yaml").model
    hf = config_to_hf(cfg, "bfloat16")
    with torch.device("meta"):
        meta_model = MllamaForConditionalGeneration(MllamaConfig(
            text_config=hf["text_config"], vision_config=hf["vision_config"],
            image_token_index=hf["image_token_index"]))
    hf_total = sum(p.numel() for p in meta_model.parameters())
    assert hf_total == expected_hf
    assert cli.main(["info", "--config", f"configs/models/{name}.yaml"]) == 0
    total_line = [l for l in capsys.readouterr().out.splitlines() if l.startswith("total")][0]
    assert int(total_line.split()[-1].replace(",", "")) == hf_total
