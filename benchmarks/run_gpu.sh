#!/usr/bin/env bash
# GPU benchmarks (one H100/H200): the PubMed recipe's shapes on the Qwen2.5-3B shape.
#   bash benchmarks/run_gpu.sh [extra benchmarks/gpu.py flags]
# Installs the CUDA build of JAX into .venv if needed, then runs benchmarks/gpu.py (decode HBM
# roofline, update MFU, full PPO step with a 300 ms stand-in search service) and the sampler's
# GPU mode; figures are printed and saved to benchmarks/gpu_results.md.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
# shellcheck disable=SC1091
. .venv/bin/activate
if ! python -c "import jax, sys; sys.exit(jax.default_backend() != 'gpu')" 2>/dev/null; then
  python -m pip install -q --upgrade pip
  python -m pip install -q -e ".[gpu]"
fi
nvidia-smi --query-gpu=name,memory.total --format=csv || true
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
{
  echo "# GPU benchmarks, $(date -u +%Y-%m-%dT%H:%MZ)"
  python benchmarks/gpu.py "$@"
} | tee benchmarks/gpu_results.md
