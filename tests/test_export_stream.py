"""`vlm-jax export` streams: parameters are read from the checkpoint one at a time (each once) and written into
the safetensors shards as they come; the files are byte for byte those of exporting the in-memory tree."""
import filecmp
import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from vlm_jax import cli
from vlm_jax.config import load_config
from vlm_jax.convert import to_hf
from vlm_jax.convert.keymap import flatten
from vlm_jax.families import abstract_params, build_model
from vlm_jax.train import checkpoint


class _Counted:
    """A leaf that records each time it is read."""

    def __init__(self, path, array, reads):
        self.path, self.array, self.reads = path, array, reads

    def __array__(self, dtype=None, copy=None):
        self.reads.append(self.path)
        return self.array


def _random_params(model, seed: int = 0):
    """Random values of the model's shapes (no model execution: tracing is cheap, running init is not)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype),
                        nn.meta.unbox(abstract_params(model)))


def _files(path) -> list[str]:
    return sorted(os.listdir(path))


@pytest.mark.parametrize("config", ["tiny_mllama", "tiny_llava"])
@pytest.mark.parametrize("scan", [True, False])
def test_checkpoint_export_is_byte_identical_to_in_memory_and_reads_each_parameter_once(config, scan, tmp_path):
    cfg = load_config(f"configs/models/{config}.yaml", [f"model.scan_layers={scan}"])
    model = build_model(cfg.model)
    params = _random_params(model)
    checkpoint.save_params(str(tmp_path / "ckpt"), params, cfg)
    shard = 40_000  # several shards for every tiny model
    to_hf(model, params, str(tmp_path / "memory"), max_shard_bytes=shard)
    with checkpoint.lazy_params(str(tmp_path / "ckpt")) as stored:
        to_hf(model, stored, str(tmp_path / "stream"), max_shard_bytes=shard)
    names = _files(tmp_path / "memory")
    assert names == _files(tmp_path / "stream")
    assert "model.safetensors.index.json" in names and sum(n.endswith(".safetensors") for n in names) > 2
    for name in names:
        assert filecmp.cmp(tmp_path / "memory" / name, tmp_path / "stream" / name, shallow=False), name
    index = json.loads((tmp_path / "stream" / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [n for n in names if n.endswith(".safetensors")]

    reads = []
    counted = {path: _Counted(path, array, reads) for path, array in flatten(params).items()}
    to_hf(model, counted, str(tmp_path / "counted"), max_shard_bytes=shard)
    assert sorted(reads) == sorted(counted)  # every parameter read, none twice (a stack whole, once)


def test_cli_export_splits_at_max_shard_size_and_transformers_loads_it(tmp_path):
    from transformers import AutoModelForImageTextToText
    cfg = load_config("configs/models/tiny_llava.yaml", [])
    model = build_model(cfg.model)
    params = _random_params(model, seed=1)
    ckpt, out = str(tmp_path / "ckpt"), tmp_path / "hf"
    checkpoint.save_params(ckpt, params, cfg)
    assert cli.main(["export", "--checkpoint", ckpt, "--out", str(out), "--tokenizer", "",
                     "--max-shard-size", "50KiB"]) == 0
    shards = [n for n in _files(out) if n.endswith(".safetensors")]
    assert len(shards) > 2 and all(os.path.getsize(out / n) <= 50 * 1024 + 8 * 1024 for n in shards)
    _, info = AutoModelForImageTextToText.from_pretrained(str(out), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info


def test_cli_export_rejects_a_bad_max_shard_size(tmp_path, capsys):
    assert cli.main(["export", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "o"),
                     "--max-shard-size", "5 parsecs"]) == 2
    assert "--max-shard-size 5 parsecs: expected a positive size" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_an_interrupted_export_leaves_out_empty_for_a_rerun(tmp_path, monkeypatch):
    cfg = load_config("configs/models/tiny_llava.yaml", [])
    ckpt, out = str(tmp_path / "ckpt"), tmp_path / "hf"
    checkpoint.save_params(ckpt, _random_params(build_model(cfg.model)), cfg)
    argv = ["export", "--checkpoint", ckpt, "--out", str(out), "--max-shard-size", "20KB"]
    read = checkpoint._StoredArray.__array__
    reads = []

    def interrupted(self, *args, **kwargs):
        reads.append(self)
        if len(reads) == 20:  # some shards are written by now
            assert sum(n.endswith(".safetensors") for n in _files(out)) > 1
            raise KeyboardInterrupt
        return read(self, *args, **kwargs)
    monkeypatch.setattr(checkpoint._StoredArray, "__array__", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cli.main(argv)
    assert _files(out) == []
    monkeypatch.undo()
    assert cli.main(argv) == 0
    assert "model.safetensors.index.json" in _files(out)


def test_a_parameter_without_a_key_is_refused_not_dropped():
    from vlm_jax.convert.keymap import ConversionError, Rule, ours_to_hf
    shapes = {"a/kernel": (2, 3), "adapter/kernel": (3, 1), "adapter/bias": (1,)}
    with pytest.raises(ConversionError, match=r"'adapter/kernel' has no Hugging Face key \(nor do 1 more\)"):
        ours_to_hf({}, shapes, [], [Rule("a/kernel", "a.weight")], np.float32)
    layout, tensors = ours_to_hf({"a/kernel": np.ones((2, 3))}, {"a/kernel": (2, 3)}, [],
                                 [Rule("a/kernel", "a.weight")], np.float32)
    assert [name for name, _ in tensors] == ["a.weight"] and layout[0][:2] == ("a.weight", (2, 3))
