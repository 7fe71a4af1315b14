#!/usr/bin/env bash
# Multi-node GPU training under SLURM: one process per GPU; process 0's node is the coordinator.
#
#   sbatch --nodes 2 --gpus-per-node 8 --ntasks-per-node 8 launch/slurm_gpu.sh \
#       --config configs/recipes/llama3v.yaml workdir=/shared/runs/llama3v
#
# jax.distributed reads SLURM's variables itself (distributed.mode=auto); this script pins each process to its
# GPU and sets XLA GPU performance flags known to help transformer training on JAX 0.10.
#SBATCH --job-name=vlm-jax
#SBATCH --exclusive
#SBATCH --output=logs/%x-%j.out
set -euo pipefail

[[ $# -gt 0 ]] || { echo "slurm_gpu.sh: error: pass the vlm-jax train arguments (see the header)" >&2; exit 2; }
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$repo/logs"

export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true
 --xla_gpu_enable_triton_gemm=false --xla_gpu_enable_command_buffer=
 --xla_gpu_all_reduce_combine_threshold_bytes=134217728
 --xla_gpu_all_gather_combine_threshold_bytes=134217728
 --xla_gpu_reduce_scatter_combine_threshold_bytes=67108864"
export XLA_FLAGS="${XLA_FLAGS//$'\n'/}"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"

# One task per GPU: each process sees only its own device. Single quotes on purpose: the variables are the
# task's own, expanded inside srun, not here.
# shellcheck disable=SC2016
srun --kill-on-bad-exit=1 bash -c '
  export CUDA_VISIBLE_DEVICES=$SLURM_LOCALID
  exec "$0"/.venv/bin/vlm-jax train "${@:1}" > "$0/logs/vlm-jax-$SLURM_JOB_ID-$SLURM_PROCID.log" 2>&1
' "$repo" "$@"
