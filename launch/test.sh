#!/usr/bin/env bash
# The test suite: CPU only, 8 fake devices (tests/conftest.py), parallel over the machine's cores.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ] && [ -x .venv/bin/python ]; then . .venv/bin/activate; fi
exec python -m pytest -q -n "${PYTEST_WORKERS:-auto}" --dist loadfile tests "$@"
