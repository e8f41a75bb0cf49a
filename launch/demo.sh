#!/usr/bin/env bash
# The main job on CPU (README command 1): set up .venv if needed, then SFT -> PPO -> eval vs the
# original query -> HF export -> plots, all in one workdir.
#   bash launch/demo.sh [WORKDIR] [--config.a.b=v ...]      (default WORKDIR: workdirs/demo)
# Data: $DEEPRETRIEVAL_DATA_DIR (a dir holding scifact/ in BEIR layout), else ../shared/data when
# it exists, else SciFact is downloaded from BEIR's public address into the cache.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
. launch/setup_env.sh  # .venv + torch 2.13.0 (CPU) + the package, when not importable

if [ -z "${DEEPRETRIEVAL_DATA_DIR:-}" ] && [ -f ../shared/data/scifact/corpus.jsonl ]; then
  DEEPRETRIEVAL_DATA_DIR="$(cd ../shared/data && pwd)"
  export DEEPRETRIEVAL_DATA_DIR
fi

WORKDIR=workdirs/demo
if [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; then
  WORKDIR=$1
  shift
fi
mkdir -p "$WORKDIR"
echo "demo: workdir $WORKDIR, data ${DEEPRETRIEVAL_DATA_DIR:-<download into the cache>}"
python launch/demo.py --workdir="$WORKDIR" "$@" 2>&1 | tee -a "$WORKDIR/demo.log"
