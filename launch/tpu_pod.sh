#!/usr/bin/env bash
# Cloud TPU pod launcher: create a pod through queued resources, install vlm-jax on every worker, run the same
# command on all workers (one log per worker), fetch the logs, tear the pod down.
#
#   launch/tpu_pod.sh --name my-run --project P --zone us-east5-a --accelerator v5p-64 \
#       --bucket gs://my-bucket/vlm-jax --dry-run all -- --config configs/recipes/llama3v.yaml
#
# Steps: create | setup | run | logs | delete | all (create, setup, run, logs, delete).
# --dry-run prints every gcloud command instead of running it. Everything after `--` goes to `vlm-jax train`.
set -euo pipefail

name="" project="" zone="" accelerator="" runtime="" bucket="" spot=0 dry_run=0 step=""
train_args=()

usage() { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
die() { echo "tpu_pod.sh: error: $*" >&2; exit 2; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) name="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --accelerator) accelerator="$2"; shift 2 ;;
    --runtime-version) runtime="$2"; shift 2 ;;
    --bucket) bucket="$2"; shift 2 ;;
    --spot) spot=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage 0 ;;
    --) shift; train_args=("$@"); break ;;
    create|setup|run|logs|delete|all) step="$1"; shift ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done

[[ -n "$name" && -n "$project" && -n "$zone" && -n "$accelerator" && -n "$step" ]] \
  || die "--name, --project, --zone, --accelerator and a step are required (see --help)"

if [[ -z "$runtime" ]]; then
  case "$accelerator" in
    v4-*) runtime="tpu-ubuntu2204-base" ;;
    v5p-*) runtime="v2-alpha-tpuv5" ;;
    v5litepod-*|v5e-*) runtime="v2-alpha-tpuv5-lite" ;;
    v6e-*) runtime="v2-alpha-tpuv6e" ;;
    *) die "no default runtime for --accelerator $accelerator; pass --runtime-version" ;;
  esac
fi
# gcloud names v5e pods v5litepod-N.
gcloud_accelerator="${accelerator/v5e-/v5litepod-}"
where=(--project "$project" --zone "$zone")
remote_dir="vlm-jax"
tarball="/tmp/vlm-jax-${name}.tar.gz"

run() {
  if [[ "$dry_run" == 1 ]]; then
    printf '%q' "$1"; shift; printf ' %q' "$@"; echo
  else
    "$@"
  fi
}

on_all_workers() {
  run gcloud compute tpus tpu-vm ssh "$name" "${where[@]}" --worker=all --command "$1"
}

create() {
  local capacity=()
  [[ "$spot" == 1 ]] && capacity=(--spot)
  run gcloud compute tpus queued-resources create "$name" --node-id "$name" "${where[@]}" \
    --accelerator-type "$gcloud_accelerator" --runtime-version "$runtime" "${capacity[@]}"
  if [[ "$dry_run" == 1 ]]; then
    run gcloud compute tpus queued-resources describe "$name" "${where[@]}" --format 'value(state.state)'
    return
  fi
  until [[ "$(gcloud compute tpus queued-resources describe "$name" "${where[@]}" \
              --format 'value(state.state)')" == ACTIVE ]]; do
    echo "waiting for $name to become ACTIVE..."; sleep 30
  done
}

setup() {
  local repo
  repo="$(cd "$(dirname "$0")/.." && pwd)"
  run tar -C "$repo" --exclude .venv --exclude workdirs --exclude .git -czf "$tarball" .
  run gcloud compute tpus tpu-vm scp "$tarball" "$name:vlm-jax.tar.gz" "${where[@]}" --worker=all
  on_all_workers "mkdir -p $remote_dir && tar -xzf vlm-jax.tar.gz -C $remote_dir && cd $remote_dir && \
python3 -m venv .venv && .venv/bin/pip install -q -e '.[tpu]'"
}

train() {
  local args workdir=""
  [[ -n "$bucket" ]] && workdir="workdir=$bucket/$name"
  printf -v args '%q ' "${train_args[@]}"
  on_all_workers "cd $remote_dir && mkdir -p logs && .venv/bin/vlm-jax train $args$workdir \
> logs/worker-\$(hostname).log 2>&1; echo exit \$? >> logs/worker-\$(hostname).log"
}

logs() {
  run mkdir -p "logs/$name"
  run gcloud compute tpus tpu-vm scp "$name:$remote_dir/logs/*" "logs/$name/" "${where[@]}" --worker=all
}

delete() {
  run gcloud compute tpus queued-resources delete "$name" "${where[@]}" --force --quiet
}

case "$step" in
  create) create ;;
  setup) setup ;;
  run) train ;;
  logs) logs ;;
  delete) delete ;;
  all) create; setup; train; logs; delete ;;
esac
