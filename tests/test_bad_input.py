"""User mistakes give one clear line on stderr and a non-zero exit, never a traceback; nothing is overwritten."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from vlm_jax import cli
from vlm_jax.convert.safetensors_io import read_dir, write_dir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def _fails(capsys, argv, *needles):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def _edit_config(path, edit):
    cfg_path = os.path.join(path, "config.json")
    cfg = json.load(open(cfg_path))
    edit(cfg)
    json.dump(cfg, open(cfg_path, "w"))


def test_missing_weights(hf_mllama_dir, tmp_path, capsys):
    d = _copy(hf_mllama_dir[1], tmp_path / "hf")
    os.remove(os.path.join(d, "model.safetensors"))
    _fails(capsys, ["import", "--hf", d, "--out", str(tmp_path / "o")], "no *.safetensors weights")


def test_pickled_weights_are_refused_with_a_hint(hf_mllama_dir, tmp_path, capsys):
    d = _copy(hf_mllama_dir[1], tmp_path / "hf")
    os.rename(os.path.join(d, "model.safetensors"), os.path.join(d, "pytorch_model.bin"))
    _fails(capsys, ["import", "--hf", d, "--out", str(tmp_path / "o")], "not loaded for safety")


def test_truncated_safetensors(hf_mllama_dir, tmp_path, capsys):
    d = _copy(hf_mllama_dir[1], tmp_path / "hf")
    f = os.path.join(d, "model.safetensors")
    os.truncate(f, os.path.getsize(f) - 1000)
    _fails(capsys, ["import", "--hf", d, "--out", str(tmp_path / "o")], "truncated safetensors file")


def test_missing_key(hf_mllama_dir, tmp_path, capsys):
    tensors = dict(read_dir(hf_mllama_dir[1]))
    del tensors["language_model.model.layers.1.cross_attn.k_norm.weight"]
    d = tmp_path / "hf"
    write_dir(str(d), tensors)
    shutil.copy(os.path.join(hf_mllama_dir[1], "config.json"), d)
    _fails(capsys, ["import", "--hf", str(d), "--out", str(tmp_path / "o")], "missing",
           "language_model.model.layers.1.cross_attn.k_norm.weight")


def test_shape_mismatch(hf_mllama_dir, tmp_path, capsys):
    d = _copy(hf_mllama_dir[1], tmp_path / "hf")
    _edit_config(d, lambda c: c["text_config"].update(intermediate_size=96))
    _fails(capsys, ["import", "--hf", d, "--out", str(tmp_path / "o")], "has shape", "config.json implies")


def test_unsupported_model_type(hf_mllama_dir, tmp_path, capsys):
    d = _copy(hf_mllama_dir[1], tmp_path / "hf")
    _edit_config(d, lambda c: c.update(model_type="bert"))
    _fails(capsys, ["import", "--hf", d, "--out", str(tmp_path / "o")], "model_type 'bert' is not supported")


def test_malformed_config_json(hf_mllama_dir, tmp_path, capsys):
    d = _copy(hf_mllama_dir[1], tmp_path / "hf")
    with open(os.path.join(d, "config.json"), "w") as f:
        f.write('{"model_type": "mllama", ')
    _fails(capsys, ["info", "--hf", d], "malformed JSON")


def test_inconsistent_hf_config(hf_mllama_dir, tmp_path, capsys):
    d = _copy(hf_mllama_dir[1], tmp_path / "hf")
    _edit_config(d, lambda c: c["text_config"].update(cross_attention_layers=[1, 9]))
    _fails(capsys, ["info", "--hf", d], "cross_attention_layers: 9 is out of range")


def test_malformed_yaml(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  text: {hidden_size: 64\n")
    _fails(capsys, ["info", "--config", str(bad)], "malformed YAML")


def test_import_never_overwrites(hf_mllama_dir, tmp_path, capsys):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "precious").write_text("keep me")
    _fails(capsys, ["import", "--hf", hf_mllama_dir[1], "--out", str(out)], "not empty")
    assert (out / "precious").read_text() == "keep me"


def test_export_of_missing_checkpoint(tmp_path, capsys):
    _fails(capsys, ["export", "--checkpoint", str(tmp_path / "nope"), "--to", "hf", "--out", str(tmp_path / "o")],
           "checkpoint directory not found")


def test_console_script_exits_nonzero_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "vlm_jax.cli", "info", "--hf", str(tmp_path)],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("vlm-jax info: error:") and "Traceback" not in proc.stderr


@pytest.mark.parametrize("argv,needle", [
    (["train", "--config", "configs/models/tiny_mllama.yaml", "workdir=hdfs://cluster/run"], "workdir: 'hdfs://"),
    (["train", "--config", "configs/models/tiny_mllama.yaml", "workdir=/tmp/x", "data.tokenizer=http://h/t.model",
      "data.sources=[{kind: jsonl, name: j, path: ftp://h/d.jsonl}]"], "data.sources[0].path: 'ftp://"),
    (["import", "--hf", "hf://org/model", "--out", "/tmp/never"], "--hf: 'hf://"),
    (["export", "--checkpoint", "/tmp/nope", "--out", "file:///tmp/o"], "--out: 'file://"),
    (["info", "--config", "https://example.com/c.yaml"], "--config: 'https://"),
])
def test_unknown_path_scheme_is_one_line_naming_the_key(argv, needle, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    _fails(capsys, argv, needle, "cannot read or write")
    assert not os.path.exists(os.path.join(REPO, needle.split("'")[1].split(":")[0] + ":"))  # never a local folder


def test_no_tpu_start_up_warnings_without_a_tpu():
    """libtpu is installed (for `plan`); on a machine without a TPU, commands start JAX without its warnings."""
    from jax._src import hardware_utils
    if hardware_utils.num_available_tpu_chips_and_device_id()[0] or hardware_utils.has_visible_nvidia_gpu():
        pytest.skip("this machine has an accelerator")
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    # `info` computes abstractly; the devices are then asked for as any other command would.
    code = "import sys, jax; from vlm_jax import cli; rc = cli.main(sys.argv[1:]); print(jax.devices()); sys.exit(rc)"
    proc = subprocess.run([sys.executable, "-c", code, "info", "--config", "configs/models/tiny_mllama.yaml"],
                          capture_output=True, text=True, cwd=REPO, env=env)
    assert proc.returncode == 0 and "total" in proc.stdout and "CpuDevice" in proc.stdout, proc.stderr
    assert proc.stderr == ""
