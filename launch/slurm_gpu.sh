#!/usr/bin/env bash
# Multi-node GPU training under SLURM: one process per GPU; process 0's node is the coordinator.
#
#   sbatch --nodes 2 --gpus-per-node 8 --ntasks-per-node 8 launch/slurm_gpu.sh \
#       --config configs/recipes/llama3v.yaml workdir=/shared/runs/llama3v
#
# Submit from the repository root (sbatch runs a copy of this script; the repository is then
# $SLURM_SUBMIT_DIR). jax.distributed reads SLURM's variables itself (distributed.mode=auto): the coordinator
# is the first host of SLURM_STEP_NODELIST on port 61440 + SLURM_JOB_ID % 4096 (JAX_COORDINATOR_PORT
# overrides it), and each task keeps only the GPU numbered SLURM_LOCALID, so every task sees all of its node's
# GPUs here (where SLURM binds one GPU per task, e.g. --gpus-per-task=1, export JAX_LOCAL_DEVICE_IDS=0).
# This script also sets XLA GPU performance flags known to help transformer training on JAX 0.10.
#
# Environment:
#   VLM_JAX_PYTHON  the Python that has vlm_jax installed (default: <repo>/.venv/bin/python)
#   VLM_JAX_LOGS    where each task writes vlm-jax-<job>-<task>.log (default: <repo>/logs)
#SBATCH --job-name=vlm-jax
#SBATCH --exclusive
#SBATCH --output=logs/%x-%j.out
set -euo pipefail

[[ $# -gt 0 ]] || { echo "slurm_gpu.sh: error: pass the vlm-jax train arguments (see the header)" >&2; exit 2; }
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
[[ -f "$repo/launch/slurm_gpu.sh" ]] || repo="${SLURM_SUBMIT_DIR:-$PWD}"  # sbatch's copy, in its spool dir
python="${VLM_JAX_PYTHON:-$repo/.venv/bin/python}"
logs="${VLM_JAX_LOGS:-$repo/logs}"
[[ -x "$python" ]] || { echo "slurm_gpu.sh: error: no Python at $python; set VLM_JAX_PYTHON" >&2; exit 2; }
mkdir -p "$logs"

export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true
 --xla_gpu_enable_triton_gemm=false --xla_gpu_enable_command_buffer=
 --xla_gpu_all_reduce_combine_threshold_bytes=134217728
 --xla_gpu_all_gather_combine_threshold_bytes=134217728
 --xla_gpu_reduce_scatter_combine_threshold_bytes=67108864"
export XLA_FLAGS="${XLA_FLAGS//$'\n'/}"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"

# No CUDA_VISIBLE_DEVICES pin: jax.distributed selects GPU SLURM_LOCALID itself, which a process that saw only
# one GPU (numbered 0) would not have. Single quotes on purpose: the variables are the task's own, expanded
# inside srun, not here.
# shellcheck disable=SC2016
srun --kill-on-bad-exit=1 bash -c '
  exec "$0" -m vlm_jax.cli train "${@:2}" > "$1/vlm-jax-$SLURM_JOB_ID-$SLURM_PROCID.log" 2>&1
' "$python" "$logs" "$@"
