#!/usr/bin/env bash
# The main job on the embedded default: set-up, the SmolLM2 testbed (built once, cached), then
# `python -m jmerge.search --config configs/demo.yaml` and its report (out/demo/report/).
#   bash scripts/demo.sh --smoke   the same path in miniature (smoke testbed, configs/smoke.yaml):
#                                  what CI runs in a runtime-only environment
# Other arguments go to the search. JMERGE_VENV names the virtualenv (default .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${JMERGE_VENV:-.venv}
TESTBED=() CONFIG=configs/demo.yaml
if [ "${1:-}" = "--smoke" ]; then shift; TESTBED=(--smoke --no-eval); CONFIG=configs/smoke.yaml; fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
"$VENV/bin/python" -m pip install -q -e . 2>&1 | grep -v "is ignored" || true
"$VENV/bin/python" -c "import jmerge, jax, flax, transformers, jinja2"  # the install really worked
# XSTest (dev data, not shipped) sharpens the over-refusal suite when it is beside the checkout.
if [ -z "${JMERGE_DATA:-}" ] && [ -d ../shared/data/xstest ]; then export JMERGE_DATA=$(cd ../shared/data && pwd); fi
time "$VENV/bin/python" scripts/build_testbed.py "${TESTBED[@]}"
time "$VENV/bin/python" -m jmerge.search --config "$CONFIG" "$@"
