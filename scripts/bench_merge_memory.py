"""The in-memory merge operator against the machine's copy bandwidth, same backend, same run.

    python scripts/bench_merge_memory.py [--size 135m|1b] [--methods ...] [--repeats 5]

Inputs are the bf16 families that scripts/bench_merge.py builds (base + 2 variants of SmolLM2-135M,
or of a random ~1.1B Llama), loaded onto the device once. Timed: what
`jmerge merge --mode memory` runs once the inputs are loaded (jmerge.engine.memory.merge_arrays: every
tensor of the model merged, the non-finite check included), inputs already on the device, median of --repeats calls. Not
timed: reading the files and writing the output (that is what bench_merge.py measures).
Bandwidth = (bytes of the K + 1 inputs + bytes of the output) / time. The peer: a jitted
`x * s` over one buffer as large as a model (reads it once, writes it once) on the same backend.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import bench_merge  # noqa: E402  (the input builders and the method configs)


def median_seconds(fn, repeats: int) -> float:
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def copy_bandwidth(nbytes: int, repeats: int) -> float:
    """Bytes read + written per second by a jitted elementwise pass over an nbytes buffer, the
    best of bfloat16 and float32 (the faster one is the fairer yardstick)."""
    best = 0.0
    for dtype in (jnp.bfloat16, jnp.float32):
        x = jnp.ones((nbytes // jnp.dtype(dtype).itemsize // 1024, 1024), dtype)
        s = jnp.asarray(1.0, dtype)
        f = jax.jit(lambda x, s: x * s)
        best = max(best, 2 * x.nbytes / median_seconds(lambda: f(x, s), repeats))
        del x
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=("135m", "1b"), default="135m")
    ap.add_argument("--methods", nargs="+", default=["task_arithmetic", "ties", "dare_ties", "slerp"])
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args(argv)

    from jmerge import sharding as shd
    from jmerge.default_model import cache_root
    from jmerge.engine import check_plan, load_plan
    from jmerge.engine.groups import build_groups, group_params
    from jmerge.engine.memory import load_inputs, merge_arrays
    from jmerge.engine.prepare import prepare

    root = cache_root() / "bench"
    fam = bench_merge.smollm2_inputs(root) if a.size == "135m" else bench_merge.llama_1b_inputs(root)
    mesh = shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1})
    dev = jax.devices()[0]
    print(f"{a.size} family under {root}; jax {jax.__version__} on {dev.platform} ({dev.device_kind}); "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus", flush=True)
    model_bytes = None
    copy = None
    with tempfile.TemporaryDirectory() as tmp:
        for method in a.methods:
            cfg_path = Path(tmp) / f"{method}.yml"
            cfg_path.write_text(bench_merge.CONFIGS[method].format(base=fam["base"], v1=fam["v1"], v2=fam["v2"]))
            p = prepare(check_plan(load_plan(cfg_path)))
            groups = build_groups(p)
            inputs = load_inputs(p, groups, mesh)
            gp = [group_params(p, g, 0) for g in groups]
            args = (p, groups, inputs, [x[0] for x in gp], [x[1] for x in gp], mesh)
            t = median_seconds(lambda: merge_arrays(*args), a.repeats)
            out, _ = merge_arrays(*args)
            nin = sum(x.nbytes for x in jax.tree.leaves(inputs))
            nout = sum(x.nbytes for x in jax.tree.leaves(out))
            if copy is None:
                model_bytes = nout
                copy = copy_bandwidth(model_bytes, a.repeats)
                print(f"copy bandwidth (x * s over {model_bytes / 1e9:.2f} GB, read + write): {copy / 1e9:.1f} GB/s",
                      flush=True)
            bw = (nin + nout) / t
            print(f"{method:16s} {t * 1e3:9.1f} ms  in {nin / 1e9:.2f} GB + out {nout / 1e9:.2f} GB  "
                  f"{bw / 1e9:7.1f} GB/s = {bw / copy * 100:5.1f}% of copy bandwidth", flush=True)
            del inputs, out, args
    return 0


if __name__ == "__main__":
    sys.exit(main())
