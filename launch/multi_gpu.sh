#!/usr/bin/env bash
# Multi-GPU / multi-host launcher: one JAX process per host (all its GPUs) or per GPU.
#
# On each host (same command everywhere, NODE_RANK differs):
#   COORDINATOR=10.0.0.1:12355 NUM_NODES=2 NODE_RANK=0 bash launch/multi_gpu.sh \
#       launch/train.py --config=configs/pubmed.py --workdir=/shared/runs/pubmed
# One process per GPU instead (PER_GPU=1): this script starts one process per local GPU, with
# CUDA_VISIBLE_DEVICES set to that GPU and process_id = NODE_RANK * GPUS_PER_NODE + local rank.
# Single host, all GPUs, no coordinator: just run `python launch/train.py ...` directly.
# The workdir must be on a filesystem every host sees (checkpoints are joined by all hosts).
set -euo pipefail
: "${COORDINATOR:?set COORDINATOR=host:port of node 0}"
NUM_NODES="${NUM_NODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
[ $# -ge 1 ] || { echo "usage: $0 launch/train.py --config=... --workdir=..." >&2; exit 2; }
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ] && [ -x .venv/bin/python ]; then . .venv/bin/activate; fi

if [ "${PER_GPU:-0}" != 1 ]; then
  exec python "$@" --coordinator_address="$COORDINATOR" \
    --num_processes="$NUM_NODES" --process_id="$NODE_RANK"
fi

GPUS_PER_NODE="${GPUS_PER_NODE:-$(nvidia-smi -L | wc -l)}"
NUM_PROCESSES=$((NUM_NODES * GPUS_PER_NODE))
PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null || true' INT TERM
for ((i = 0; i < GPUS_PER_NODE; i++)); do
  CUDA_VISIBLE_DEVICES="$i" python "$@" --coordinator_address="$COORDINATOR" \
    --num_processes="$NUM_PROCESSES" --process_id=$((NODE_RANK * GPUS_PER_NODE + i)) &
  PIDS+=($!)
done
STATUS=0
for pid in "${PIDS[@]}"; do wait "$pid" || STATUS=$?; done
exit "$STATUS"
