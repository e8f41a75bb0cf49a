#!/usr/bin/env bash
# GPU benchmarks (one H100/H200): the PubMed recipe's shapes on the Qwen2.5-3B shape.
#   bash benchmarks/run_gpu.sh [extra benchmarks/gpu.py flags]
#   PYTHON=python3 bash benchmarks/run_gpu.sh   # an interpreter that already has CUDA JAX and
#                                               # this package's needs (an offline GPU image)
# Without PYTHON it installs the CUDA build of JAX into .venv if needed. Then it runs
# benchmarks/gpu.py (decode HBM roofline, update MFU, full PPO step with a 300 ms stand-in search
# service); figures are printed and saved to benchmarks/gpu_results.md (progress lines on stderr).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
  PYTHON=.venv/bin/python
  if ! $PYTHON -c "import jax, sys; sys.exit(jax.default_backend() != 'gpu')" 2>/dev/null; then
    $PYTHON -m pip install -q --upgrade pip
    $PYTHON -m pip install -q -e ".[gpu]"
  fi
fi
nvidia-smi --query-gpu=name,memory.total --format=csv || true
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
{
  echo "# GPU benchmarks, $(date -u +%Y-%m-%dT%H:%MZ)"
  "$PYTHON" benchmarks/gpu.py "$@"
} | tee benchmarks/gpu_results.md
