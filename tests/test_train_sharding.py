"""Training is sharding-invariant (1 device, dp 8, fsdp 8, fsdp 2 x tensor 4 with the vision towers split by
heads or by images), and a checkpoint written on 8 devices restores and continues on 4 and on 1 device."""
import os
import shutil

import jax
import numpy as np
import pytest

from vlm_jax.train.loop import train
from train_helpers import final_params, tiny_config

STEPS = ["train.steps=12", "train.log.every_steps=12", "train.checkpoint.every_steps=6",
         "train.checkpoint.async_save=false", "model.text.num_heads=4", "model.text.num_kv_heads=4"]
MESHES = {
    "1 device": (1, ["mesh.fsdp=-1"]),
    "dp 8": (8, ["mesh.data=8", "mesh.fsdp=1", "mesh.rules=dp"]),
    "fsdp 8": (8, ["mesh.fsdp=8"]),
    "fsdp 2 x tensor 4": (8, ["mesh.fsdp=2", "mesh.tensor=4", "mesh.rules=fsdp_tp"]),
    "fsdp 2 x tensor 4, vision towers data-parallel": (8, ["mesh.fsdp=2", "mesh.tensor=4",
                                                          "mesh.rules=fsdp_tp_vision_dp"]),
}


def _run(workdir, n_devices, mesh_overrides):
    cfg = tiny_config(workdir, *STEPS, *mesh_overrides)
    return train(cfg, devices=jax.devices()[:n_devices], echo=lambda _: None)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharding")
    return {name: (str(root / str(i)), _run(str(root / str(i)), n, ov))
            for i, (name, (n, ov)) in enumerate(MESHES.items())}


def test_losses_agree_across_meshes(runs):
    reference = runs["1 device"][1].losses
    assert sorted(reference) == list(range(1, 13))
    assert reference[12] < reference[1]  # it trains
    for name, (_, result) in runs.items():
        got = np.array([result.losses[s] for s in range(1, 13)])
        np.testing.assert_allclose(got, [reference[s] for s in range(1, 13)], rtol=1e-5, err_msg=name)


@pytest.mark.parametrize("n_devices,mesh_overrides", [(4, ["mesh.fsdp=4"]), (1, ["mesh.fsdp=-1"])])
def test_checkpoint_from_8_devices_continues_on_fewer(runs, tmp_path, n_devices, mesh_overrides):
    source_dir, on_8 = runs["fsdp 8"]
    workdir = str(tmp_path / "run")
    shutil.copytree(source_dir, workdir)
    shutil.rmtree(os.path.join(workdir, "checkpoints", "12"))  # leave step 6, written on 8 devices
    result = _run(workdir, n_devices, mesh_overrides)
    assert sorted(result.losses) == list(range(7, 13))
    assert result.state.params["text"]["lm_head"]["kernel"].sharding.mesh.devices.size == n_devices
    np.testing.assert_allclose([result.losses[s] for s in range(7, 13)], [on_8.losses[s] for s in range(7, 13)],
                               rtol=1e-5)
    want, got = final_params(source_dir), final_params(workdir)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-6, err_msg=name)
