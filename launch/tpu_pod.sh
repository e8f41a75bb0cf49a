#!/usr/bin/env bash
# Run one training command on every worker of a Cloud TPU pod slice (JAX needs the same program
# on all hosts; jax.distributed.initialize() finds the coordinator from the TPU metadata).
#
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a bash launch/tpu_pod.sh \
#       launch/train.py --config=configs/pubmed.py --workdir=/mnt/runs/pubmed \
#       --config.model.hf_path=/ckpt/Qwen2.5-3B-Instruct
#
# Optional: PROJECT (gcloud project), REPO_DIR (checkout path on the workers, default
# ~/deepretrieval_jax), SETUP=1 (pip install the package with the [tpu] extra first).
# The workdir must be one directory every worker sees (NFS/Filestore, or a gcsfuse mount of a
# bucket): every host joins each checkpoint. gs:// URLs are not supported by the workdir code.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}"
: "${ZONE:?set ZONE}"
[ $# -ge 1 ] || { echo "usage: $0 launch/train.py --config=... --workdir=..." >&2; exit 2; }
REPO_DIR="${REPO_DIR:-~/deepretrieval_jax}"
PROJECT_FLAG=()
[ -n "${PROJECT:-}" ] && PROJECT_FLAG=(--project "$PROJECT")

ARGS=$(printf '%q ' "$@")
REMOTE="cd $REPO_DIR"
if [ "${SETUP:-0}" = 1 ]; then
  REMOTE+=" && python3 -m pip install -q -e '.[tpu]'"
fi
REMOTE+=" && python3 $ARGS --distributed=on"

exec gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" "${PROJECT_FLAG[@]}" \
  --worker=all --command "$REMOTE"
