#!/usr/bin/env bash
# The main job on the embedded default: set-up, the SmolLM2 testbed (built once, cached), then
# `python -m jmerge.search --config configs/demo.yaml` and its report (out/demo/report/).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
.venv/bin/python -m pip install -q -e . 2>&1 | grep -v "is ignored" || true
.venv/bin/python -c "import jmerge, jax, flax, transformers"  # the install really worked
# XSTest (dev data, not shipped) sharpens the over-refusal suite when it is beside the checkout.
if [ -z "${JMERGE_DATA:-}" ] && [ -d ../shared/data/xstest ]; then export JMERGE_DATA=$(cd ../shared/data && pwd); fi
time .venv/bin/python scripts/build_testbed.py
time .venv/bin/python -m jmerge.search --config configs/demo.yaml "$@"
