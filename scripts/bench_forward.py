"""Forward pass: compile time against depth (the layer scan keeps it flat) and prefill tokens/s
on SmolLM2-135M-Instruct, float32 and bfloat16.

    python scripts/bench_forward.py [--batch 8] [--seq 128]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from jmerge.default_model import default_model_dir
from jmerge.io import load_model
from jmerge.models import llama


def compile_seconds(cfg, params, ids) -> float:
    fn = jax.jit(lambda p, i: llama.forward(p, cfg, i))
    t = time.perf_counter()
    fn.lower(params, ids).compile()
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    a = ap.parse_args()
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {jax.device_count()} device(s)")
    m = load_model(default_model_dir())
    ids = np.random.RandomState(0).randint(0, m.cfg.vocab_size, (a.batch, a.seq))

    print("\ncompile time vs depth (random weights, SmolLM2 widths):")
    for depth in (2, 8, 30, 60):
        cfg = dataclasses.replace(m.cfg, num_layers=depth, layer_windows=(0,) * depth)
        p = jax.eval_shape(lambda: llama.init_params(cfg))
        print(f"  {depth:3d} layers: {compile_seconds(cfg, p, ids):6.2f} s")

    for dtype in (jnp.float32, jnp.bfloat16):
        params = jax.tree.map(lambda x: x.astype(dtype), m.params)
        fn = jax.jit(lambda p, i: llama.forward(p, m.cfg, i))
        fn(params, ids).block_until_ready()
        reps, t = 3, time.perf_counter()
        for _ in range(reps):
            fn(params, ids).block_until_ready()
        dt = (time.perf_counter() - t) / reps
        print(f"\nforward {np.dtype(dtype).name}: batch {a.batch} x {a.seq} tokens: {dt * 1e3:.0f} ms, "
              f"{a.batch * a.seq / dt:,.0f} tokens/s")


if __name__ == "__main__":
    main()
