#!/usr/bin/env bash
# Cloud TPU VM / pod slice: create it, install the package on every worker, run, delete.
#
#   TPU_NAME=arcvq ZONE=us-central2-b ACCELERATOR_TYPE=v4-32 bash launch/tpu_vm.sh create
#   TPU_NAME=arcvq ZONE=us-central2-b bash launch/tpu_vm.sh setup
#   TPU_NAME=arcvq ZONE=us-central2-b CONFIG=configs/imagenet.py WORKDIR=gs://BUCKET/run1 \
#     bash launch/tpu_vm.sh run --config.data.data_dir=gs://BUCKET/tfds
#   TPU_NAME=arcvq ZONE=us-central2-b bash launch/tpu_vm.sh delete
#
# Every worker runs the same `python -m arcvq_jax.main` (--worker=all); JAX detects the slice
# and joins the hosts by itself, each host reads its own share of every batch. WORKDIR must
# be a gs:// path every worker can write (checkpoints, logs). Preemption (spot/queued
# resources, maintenance) sends SIGTERM: the run saves a checkpoint and exits; run the same
# `run` command again to resume. DRY_RUN=1 prints the gcloud commands without running them.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/common.sh

action=${1:-}
shift || true
require TPU_NAME "the TPU VM's name" "$action"
require ZONE "its zone, e.g. us-central2-b" "$action"
project=()
[ -n "${PROJECT:-}" ] && project=(--project="$PROJECT")
tpu=(gcloud compute tpus tpu-vm)
remote_dir='~/arcvq-jax'

case "$action" in
  create)
    require ACCELERATOR_TYPE "the slice, e.g. v4-8 (one host) or v4-32 (four hosts)" create
    echo "Creating TPU VM $TPU_NAME ($ACCELERATOR_TYPE) in $ZONE${SPOT:+ as a spot VM}."
    spot=()
    [ -n "${SPOT:-}" ] && spot=(--spot)
    run "${tpu[@]}" create "$TPU_NAME" --zone="$ZONE" "${project[@]}" \
      --accelerator-type="$ACCELERATOR_TYPE" --version="${RUNTIME_VERSION:-tpu-ubuntu2204-base}" \
      "${spot[@]}"
    ;;
  setup)
    echo "Copying this checkout to $remote_dir on every worker of $TPU_NAME and installing it."
    run "${tpu[@]}" scp --recurse --worker=all --zone="$ZONE" "${project[@]}" \
      arcvq_jax configs launch pyproject.toml README.md "$TPU_NAME:$remote_dir"
    run "${tpu[@]}" ssh "$TPU_NAME" --worker=all --zone="$ZONE" "${project[@]}" \
      --command="cd $remote_dir && pip install -q -e . 'jax[tpu]'"
    ;;
  run)
    require CONFIG "the experiment config, e.g. configs/imagenet.py" run
    require WORKDIR "a gs:// directory for checkpoints and logs, e.g. gs://BUCKET/run1" run
    case "$WORKDIR" in
      gs://*) ;;
      *) echo "error: WORKDIR=$WORKDIR is not a gs:// path; every worker must write the same" \
              "checkpoints, so use a bucket, e.g. WORKDIR=gs://BUCKET/run1" >&2; exit 2 ;;
    esac
    overrides=$(printf ' %q' "$@")
    echo "Running $CONFIG on every worker of $TPU_NAME; checkpoints and logs in $WORKDIR."
    run "${tpu[@]}" ssh "$TPU_NAME" --worker=all --zone="$ZONE" "${project[@]}" \
      --command="cd $remote_dir && python -m arcvq_jax.main --config=$CONFIG --workdir=$WORKDIR$overrides"
    ;;
  delete)
    echo "Deleting TPU VM $TPU_NAME."
    run "${tpu[@]}" delete "$TPU_NAME" --zone="$ZONE" "${project[@]}" --quiet
    ;;
  *)
    echo "usage: bash launch/tpu_vm.sh create|setup|run|delete [--config.key=value ...]" >&2
    exit 2
    ;;
esac
