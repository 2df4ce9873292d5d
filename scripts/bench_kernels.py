"""Time the Pallas kernels against their jnp references on the present backend.

    python scripts/bench_kernels.py [--elements N] [--dtype bfloat16] [--models 3] [--repeats 10]

On GPU/TPU it prints kernel and reference times and ref/kernel (>1 means the kernel is faster).
On CPU only the references run (Pallas needs a GPU/TPU; add --interpret to also run the
kernels in interpret mode, which measures nothing but checks they execute).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from jmerge.kernels import dare_fused as D
from jmerge.kernels import magnitude_count as M
from jmerge.kernels import ties_fused as T


def timed(fn, *args, repeats: int) -> float:
    """Median wall time in ms of a jitted call (after one warm-up/compile call)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * sorted(times)[len(times) // 2]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    on_accel = jax.default_backend() in ("gpu", "tpu")
    ap.add_argument("--elements", type=int, default=(1 << 26) if on_accel else (1 << 20))
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--models", type=int, default=3, help="K task vectors for TIES")
    ap.add_argument("--thresholds", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--interpret", action="store_true", help="on CPU, also run interpret mode")
    args = ap.parse_args(argv)

    run_kernel = on_accel or args.interpret
    interp = not on_accel
    n, dtype = args.elements // 1024 * 1024, jnp.dtype(args.dtype)
    if n == 0:
        raise SystemExit("--elements must be at least 1024")
    keys = jax.random.split(jax.random.key(0), args.models + 2)
    x = jax.random.normal(keys[0], (n // 1024, 1024), dtype)
    tvs = [jax.random.normal(k, x.shape, dtype) for k in keys[1:1 + args.models]]
    t = jnp.linspace(0.0, 3.0, args.thresholds, dtype=jnp.float32)
    w = jnp.linspace(0.5, 1.5, args.models, dtype=jnp.float32)
    thr = jnp.full((args.models,), 0.8, jnp.float32)
    k = n // 5
    dkey = keys[-1]

    cases = {
        f"magnitude_count B={args.thresholds}": (
            jax.jit(lambda x, t: M.magnitude_count_kernel(x, t, interpret=interp)),
            jax.jit(M.magnitude_count_reference), (x, t)),
        "kth_largest_abs (16-way vs bisection)": (
            jax.jit(lambda x, k: M.kth_largest_abs_kernel(x, k, interpret=interp)),
            jax.jit(M.kth_largest_abs_reference), (x, k)),
        f"ties_merge K={args.models} thresholds": (
            jax.jit(lambda tv, w, th: T.ties_merge_kernel(tv, w, thresholds=th, interpret=interp)),
            jax.jit(lambda tv, w, th: T.ties_merge_reference(tv, w, thresholds=th)),
            (tvs, w, thr)),
        "dare density=0.3": (
            jax.jit(lambda x, key: D.dare_kernel(x, 0.3, key, interpret=interp)),
            jax.jit(lambda x, key: D.dare_reference(x, 0.3, key)), (x, dkey)),
    }

    print(f"backend={jax.default_backend()} device={jax.devices()[0].device_kind} "
          f"elements={n} ({n * dtype.itemsize / 1e6:.0f} MB per tensor) dtype={dtype.name} "
          f"kernels={'interpret' if interp and run_kernel else 'on' if run_kernel else 'off'}")
    for name, (kernel, reference, fargs) in cases.items():
        ref_ms = timed(reference, *fargs, repeats=args.repeats)
        line = f"{name:40s} reference {ref_ms:9.3f} ms"
        if run_kernel:
            ker_ms = timed(kernel, *fargs, repeats=args.repeats)
            got = np.asarray(kernel(*fargs), np.float64)
            want = np.asarray(reference(*fargs), np.float64)
            diff = float(np.max(np.abs(got - want))) if got.size else 0.0
            line += (f"  kernel {ker_ms:9.3f} ms  ref/kernel {ref_ms / ker_ms:6.2f}x  "
                     f"max |kernel - reference| {diff:.3g}")
        print(line, flush=True)


if __name__ == "__main__":
    main()
