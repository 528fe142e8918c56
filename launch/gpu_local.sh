#!/usr/bin/env bash
# All GPUs of this host.
#
#   CONFIG=configs/imagenet.py WORKDIR=/data/runs/f8 bash launch/gpu_local.sh --config.batch_size=64
#
# NPROC=1 (default): one process drives every visible GPU (one Mesh over them).
# NPROC=N: one process per GPU (CUDA_VISIBLE_DEVICES=i), joined through JAX's distributed
# runtime on localhost:PORT (default 12355), as a multi-node run would be; the script waits
# for all and fails if any fails. Ctrl-C / SIGTERM reaches every process: each saves a
# checkpoint and exits, and the same command resumes. DRY_RUN=1 prints the commands.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/common.sh

require CONFIG "the experiment config, e.g. configs/imagenet.py"
require WORKDIR "a directory for checkpoints and logs, e.g. /data/runs/f8"
nproc=${NPROC:-1}
port=${PORT:-12355}
cmd=(python -m arcvq_jax.main --config="$CONFIG" --workdir="$WORKDIR" "$@")

if [ "$nproc" = 1 ]; then
  echo "One process on every visible GPU; checkpoints and logs in $WORKDIR."
  run "${cmd[@]}"
  exit 0
fi
echo "$nproc processes, one GPU each, coordinator localhost:$port; checkpoints and logs in $WORKDIR."
pids=()
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM INT
for ((i = 0; i < nproc; i++)); do
  run env CUDA_VISIBLE_DEVICES="$i" "${cmd[@]}" --coordinator_address="localhost:$port" \
    --num_processes="$nproc" --process_id="$i" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=$?
done
exit "$status"
