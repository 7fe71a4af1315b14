"""The SLURM launcher on localhost: a fake `srun` starts `launch/slurm_gpu.sh`'s command as 2 tasks with the
variables real srun sets, and both tasks find each other through jax.distributed's own SLURM detection
(distributed.mode=auto: coordinator, process count and id from SLURM_*), then train the tiny Mllama 2 steps
on CPU devices with gloo collectives and save one checkpoint together."""
import os
import socket
import subprocess
import sys

from vlm_jax.train import checkpoint
from train_helpers import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What srun sets per task (a 2-task step on one node), then each task's command in parallel; like
# --kill-on-bad-exit, the first task to fail ends the other (it would wait in a collective for the dead one).
FAKE_SRUN = r"""#!/usr/bin/env bash
while [[ $# -gt 0 && $1 == -* ]]; do shift; done
export SLURM_NTASKS=2 SLURM_STEP_NUM_TASKS=2 SLURM_STEP_NODELIST=localhost SLURM_STEP_NUM_NODES=1 SLURM_NODEID=0
pids=()
for task in 0 1; do SLURM_PROCID=$task SLURM_LOCALID=$task "$@" & pids+=("$!"); done
for _ in "${pids[@]}"; do
  if ! wait -n; then kill "${pids[@]}" 2>/dev/null; wait; exit 1; fi
done
"""


def _job_id() -> int:
    """A job id whose coordinator port (61440 + id % 4096, as jax's SlurmCluster derives it) is free now."""
    for port in range(61440 + os.getpid() % 4096, 61440 + 4096):
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
        return 4096 * 100 + port - 61440
    raise RuntimeError("no free port in 61440-65535")


def _env(tmp_path, **extra) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "srun").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "JAX_COORDINATOR_PORT"}
    return {**env, "PATH": f"{bin_dir}{os.pathsep}{env['PATH']}", "PYTHONPATH": REPO,
            "VLM_JAX_PYTHON": sys.executable, "VLM_JAX_LOGS": str(tmp_path / "logs"),
            "JAX_PLATFORMS": "cpu", "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
            "XLA_FLAGS": xla_flags(2), **extra}  # 2 CPU devices per task


def test_two_slurm_tasks_find_each_other_and_train(tmp_path):
    job = _job_id()
    workdir = tmp_path / "run"
    proc = subprocess.run(
        ["bash", "launch/slurm_gpu.sh", "--config", "configs/models/tiny_mllama.yaml", f"workdir={workdir}",
         "train.steps=2", "train.synthetic.enabled=true", "train.batch_size=4", "train.synthetic.seq_len=16",
         "train.log.tensorboard=false", "train.checkpoint.async_save=false", "distributed.mode=auto",
         "distributed.initialization_timeout_s=60"],
        cwd=REPO, env=_env(tmp_path, SLURM_JOB_ID=str(job)), capture_output=True, text=True, timeout=180)
    logs = {p: (tmp_path / "logs" / f"vlm-jax-{job}-{p}.log") for p in range(2)}
    outs = {p: log.read_text() if log.exists() else "(no log)" for p, log in logs.items()}
    assert proc.returncode == 0, f"{proc.stderr}\n" + "\n".join(f"task {p}:\n{o[-3000:]}" for p, o in outs.items())
    for p, out in outs.items():
        assert f"2 process(es) x 2 cpu device(s) = 4; this is process {p}" in out, out[-3000:]
        assert "finished at step 2" in out, out[-3000:]
    checkpoints = workdir / "checkpoints"
    assert sorted(d.name for d in checkpoints.iterdir() if d.name.isdigit()) == ["2"]
    assert checkpoint.incomplete_steps(checkpoints) == []


def test_under_sbatch_the_repository_is_the_submit_directory(tmp_path):
    """sbatch runs a copy of the script from its spool directory: the venv and logs are then the submit
    directory's. A fake srun that prints its arguments shows the command each task would run."""
    spool, submit = tmp_path / "spool", tmp_path / "submit"
    (submit / ".venv" / "bin").mkdir(parents=True)
    (submit / ".venv" / "bin" / "python").write_text("")
    (submit / ".venv" / "bin" / "python").chmod(0o755)
    spool.mkdir()
    with open(os.path.join(REPO, "launch", "slurm_gpu.sh")) as f:
        (spool / "slurm_script").write_text(f.read())
    env = _env(tmp_path, SLURM_JOB_ID="7", SLURM_SUBMIT_DIR=str(submit))
    del env["VLM_JAX_PYTHON"], env["VLM_JAX_LOGS"]
    (tmp_path / "bin" / "srun").write_text("#!/usr/bin/env bash\nprintf '%s\\n' \"$@\"\n")
    proc = subprocess.run(["bash", str(spool / "slurm_script"), "--config", "c.yaml", "workdir=w"], cwd=submit,
                          env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    srun_args = proc.stdout.splitlines()
    assert srun_args[:3] == ["--kill-on-bad-exit=1", "bash", "-c"]
    assert "CUDA_VISIBLE_DEVICES" not in srun_args[3]  # jax.distributed picks GPU SLURM_LOCALID of all visible
    assert srun_args[-5:] == [str(submit / ".venv" / "bin" / "python"), str(submit / "logs"), "--config", "c.yaml",
                              "workdir=w"]
    assert (submit / "logs").is_dir()
