#!/usr/bin/env bash
# Every accelerator benchmark in one go (BENCHMARKS.md's GPU section), on a machine with nothing
# but jax[cuda], flax, optax, orbax, transformers and torch installed (no network, no checkpoint):
#   bash scripts/bench_gpu.sh OUT_DIR [ASSETS_DIR]
# ASSETS_DIR holds smollm2/ (SmolLM2's config.json and tokenizer files: random weights of its
# shape are generated) and harmbench.txt (prompts, one per line). Each step logs to OUT_DIR; a
# failing step is reported and the next one runs.
set -u -o pipefail
out=${1:?usage: bench_gpu.sh OUT_DIR [ASSETS_DIR]}
assets=${2:-.bench_assets}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2 XLA_PYTHON_CLIENT_PREALLOCATE=false
export JMERGE_CACHE=${JMERGE_CACHE:-/tmp/jmerge-cache} JMERGE_NO_COMPILE_CACHE=1
py=${PYTHON:-python3}
$py -m pip install -q --no-deps --no-build-isolation --no-index . >"$out/install.txt" 2>&1 || { cat "$out/install.txt"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv | tee "$out/gpu.txt"
$py -c "import jax; print('jax', jax.__version__, jax.devices())" | tee -a "$out/gpu.txt"

step() {  # name, command...   (STEPS="kernels search_1b" runs only those)
  local name=$1; shift
  [[ -z "${STEPS:-}" || " $STEPS " == *" $name "* ]] || return 0
  echo "=== $name: $*"
  local t0=$SECONDS
  "$@" 2>&1 | grep -v "it/s\]$" | tee "$out/$name.txt" || echo "=== $name FAILED"
  echo "=== $name took $((SECONDS - t0)) s"
}
step kernels $py scripts/bench_kernels.py
step attention $py scripts/bench_attention.py fused --batch 8 --seq 2048
step merge_memory_1b $py scripts/bench_merge_memory.py --size 1b
step search_1b $py scripts/bench_search.py --shape 1b --dtype bfloat16 --batch 8 --seq 1024
step search_smollm2 $py scripts/bench_search.py --shape smollm2 --dtype bfloat16 --batch 16 --seq 512
step generate_b16 $py scripts/bench_generate.py --random-like "$assets/smollm2" --prompts "$assets/harmbench.txt" --batch 16 --new 64 --repeats 3
step generate_b64 $py scripts/bench_generate.py --random-like "$assets/smollm2" --prompts "$assets/harmbench.txt" --batch 64 --new 128 --repeats 3
