#!/usr/bin/env bash
# Set up a virtualenv, install jmerge with its test extras, fetch the embedded default model
# (real weights for the `slow` tests), and run the test suite. Extra args go to pytest
# (JMERGE_TEST_WORKERS=0 runs it in one process).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
.venv/bin/python -m pip install -q -e ".[test]" 2>&1 | grep -v "is ignored" || true
.venv/bin/python -c "import jmerge, jax, flax, torch, transformers, xdist" # the install really worked
.venv/bin/python -m jmerge default-model
# Two workers, a test file each at a time (module fixtures and compiled programs stay shared
# within a file): the suite is mostly one thread at a time, so this nearly halves it on 2 cores.
exec .venv/bin/python -m pytest -q -n "${JMERGE_TEST_WORKERS:-2}" --dist loadfile "$@"
