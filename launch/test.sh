#!/usr/bin/env bash
# The test suite (README command 2; .ci/run calls it): sets up .venv with the test extras if
# needed, then runs pytest on CPU with 8 fake devices (tests/conftest.py), in parallel over the
# machine's cores. Extra arguments go to pytest. DEEPRETRIEVAL_TEST_EXTRAS=test,tpu (what .ci/run
# sets) also installs libtpu, so the TPU ahead-of-time compile test runs instead of skipping.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
. launch/setup_env.sh "${DEEPRETRIEVAL_TEST_EXTRAS:-test}"
exec python -m pytest -q -n "${PYTEST_WORKERS:-auto}" --dist loadfile tests "$@"
