"""Fine-tuning from `train.init_from`: a Hugging Face directory (converted on the fly) or `vlm-jax import`'s output
gives the first training step exactly the HF model's loss; a source that does not fit `model:` stops with one
line naming the first differing parameter and both shapes, before the workdir is touched; a resumed run ignores
init_from; the parameters land sharded on the mesh."""
import json
import os
import shutil

import jax
import numpy as np
import pytest
import torch

from hf_models import torch_inputs
from train_helpers import SMALL_RUN, TINY, tiny_config
from vlm_jax import cli, sharding
from vlm_jax.config import MeshConfig
from vlm_jax.convert import from_hf
from vlm_jax.train import checkpoint
from vlm_jax.train import optimizer as opt
from vlm_jax.train.loop import Trainer

# tiny_mllama.yaml is the HF tiny model's architecture; only the token ids differ (they come from a tokenizer).
HF_IDS = ["model.text.pad_token_id=0", "model.text.bos_token_id=1", "model.text.eos_token_id=[2]"]
ONE_STEP = ["train.synthetic.enabled=true", "train.steps=1", "train.log.every_steps=1", *HF_IDS]


def _train(workdir, source, *overrides) -> int:
    return cli.main(["train", "--config", TINY, f"workdir={workdir}", *SMALL_RUN, *ONE_STEP,
                     f"train.init_from={source}", *overrides])


def _first_loss(workdir) -> float:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return json.loads(f.readline())["loss"]


@pytest.fixture(scope="module")
def imported(hf_mllama_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("imported") / "ckpt")
    assert cli.main(["import", "--hf", hf_mllama_dir[1], "--out", out]) == 0
    return out


@pytest.fixture(scope="module")
def from_hf_run(hf_mllama_dir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("from_hf") / "run")
    assert _train(workdir, hf_mllama_dir[1]) == 0
    return workdir


@pytest.mark.slow  # compiles and runs a train step
def test_first_step_loss_is_the_hf_models_loss(hf_mllama_dir, from_hf_run, tmp_path):
    hf_model, _ = hf_mllama_dir
    trainer = Trainer(tiny_config(str(tmp_path), "train.steps=1", *HF_IDS), echo=lambda _: None)
    batch = next(trainer.data.iterator(0, {}))  # the run's first batch: generated from the seed alone
    labels = np.where(batch["loss_mask"] > 0, batch["input_ids"], -100).astype(np.int64)
    inputs = {k: np.asarray(v, np.int64 if np.issubdtype(v.dtype, np.integer) else v.dtype)
              for k, v in batch.items() if k != "loss_mask"}
    with torch.no_grad():
        want = float(hf_model(**torch_inputs(inputs), labels=torch.from_numpy(labels)).loss)
    got = _first_loss(from_hf_run)
    print(f"first-step loss: vlm-jax train (init_from HF dir) {got!r}, transformers {want!r}")
    assert got == pytest.approx(want, rel=1e-5)


@pytest.mark.slow  # compiles and runs a train step
def test_init_from_an_import_gives_the_same_first_loss(imported, from_hf_run, tmp_path):
    workdir = str(tmp_path / "run")
    assert _train(workdir, imported) == 0
    assert _first_loss(workdir) == pytest.approx(_first_loss(from_hf_run), rel=1e-6)


@pytest.mark.parametrize("source,override,want", [
    ("hf", "model.text.hidden_size=96", "params/projector/bias is float32[64] there but float32[96] in model:"),
    ("import", "model.vision.num_layers=8", "params/vision/transformer/"),
    ("import", "model.param_dtype=bfloat16", "params/projector/bias is float32[64] there but bfloat16[64]"),
    ("hf", "model.text.rope_theta=500000.0", "model.text.rope_theta is 10000.0 there but 500000.0 in model:"),
], ids=["hf-width", "import-depth", "import-dtype", "hf-rope"])
def test_a_source_that_does_not_fit_is_refused(hf_mllama_dir, imported, tmp_path, capsys, source, override, want):
    workdir = tmp_path / "run"
    code = _train(str(workdir), hf_mllama_dir[1] if source == "hf" else imported, override)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "error: train.init_from" in err and "does not fit the config" in err and want in err, err
    assert not workdir.exists()


@pytest.mark.slow  # compiles and runs a train step
def test_a_resumed_run_ignores_init_from(hf_mllama_dir, from_hf_run, tmp_path):
    workdir = shutil.copytree(from_hf_run, str(tmp_path / "run"))
    messages = []
    result = Trainer(tiny_config(workdir, "train.steps=2", "train.log.every_steps=1", *HF_IDS,
                                 f"train.init_from={hf_mllama_dir[1]}"), echo=messages.append).run()
    assert sorted(result.losses) == [2]  # only the new step: it went on from step 1
    assert any("resumed from" in m and "step 1" in m and "train.init_from is ignored" in m for m in messages)
    assert not any("(train.init_from)" in m for m in messages), messages


def _check_sharded_like_hf(params, hf_dir):
    """Every leaf equals the converted HF tensor; the embedding is split over all 8 devices (fsdp)."""
    _, want = from_hf(hf_dir, dtype="float32")
    want, got = opt.flatten(want), opt.flatten(params)
    assert want.keys() == got.keys()
    for name in want:
        np.testing.assert_array_equal(np.asarray(got[name]), want[name], err_msg=name)
    embedding = got["text/embed_tokens/embedding"]  # (vocab + 8, embed): embed over fsdp
    assert len(embedding.sharding.device_set) == 8 and not embedding.sharding.is_fully_replicated
    assert {s.data.shape for s in embedding.addressable_shards} == {(136, 8)}


def test_params_land_sharded_on_the_mesh(hf_mllama_dir, imported, tmp_path):
    assert jax.device_count() == 8
    for source in (hf_mllama_dir[1], imported):
        trainer = Trainer(tiny_config(str(tmp_path / "run"), "train.steps=1", "mesh.rules=fsdp", *HF_IDS,
                                      f"train.init_from={source}"), echo=lambda _: None)
        _check_sharded_like_hf(trainer.fresh_state(trainer.init_source()).params, hf_mllama_dir[1])


def test_restore_params_shards_over_a_mesh(hf_mllama_dir, imported):
    """What eval and generate load: every device's share, not the whole model on one device."""
    mesh_config = MeshConfig()
    params = checkpoint.restore_params(imported, mesh=sharding.make_mesh(mesh_config),
                                       rules=sharding.load_rules(mesh_config.rules))
    _check_sharded_like_hf(params, hf_mllama_dir[1])
