#!/usr/bin/env bash
# Sourced by launch/test.sh, launch/demo.sh and .ci/run: create .venv if missing, activate it,
# and install the package (with the extras named in $1, e.g. "test") when it is not importable.
#   . launch/setup_env.sh [EXTRAS]
# torch 2.13.0 (CPU) is installed first so that no dependency pulls a multi-GB CUDA build.
_extras=${1:-}
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
if [ -z "${VIRTUAL_ENV:-}" ]; then
  if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
  fi
  # shellcheck disable=SC1091
  . "$VENV/bin/activate"
fi
_probe="import deepretrieval_jax, torch, transformers"
case ",$_extras," in *,test,*) _probe="$_probe, pytest, xdist, hypothesis, sentence_transformers";; esac
case ",$_extras," in *,tpu,*) _probe="$_probe, libtpu";; esac
if [ "${DEEPRETRIEVAL_FORCE_INSTALL:-0}" = "1" ] || ! python -c "$_probe" 2>/dev/null; then
  python -m pip install -q --upgrade pip
  python -m pip install -q "torch==2.13.0"
  if [ -n "$_extras" ]; then
    python -m pip install -q -e ".[$_extras]"
  else
    python -m pip install -q -e .
  fi
fi
unset _extras _probe
