"""The compiled per-device peak of one search step at SmolLM2's shape against sequence length: how
long a sequence fits a memory budget (XLA's memory analysis; no weights, nothing run).

    python scripts/bench_search_length.py [--mode coefficients|masks] [--batch 8] [--dtype float32]
                                          [--lengths 1024,2048,4096]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=("coefficients", "masks"), default="coefficients")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--lengths", default="1024,2048,4096,8192")
    a = ap.parse_args(argv)
    import jax
    import jax.numpy as jnp

    from bench_search import model_config
    from jmerge.models import llama
    from jmerge.search import gradient as G
    from jmerge.search.parametrisations import Coefficients, Masks
    cfg = model_config("smollm2")
    base = jax.eval_shape(lambda: llama.init_params(cfg, seed=0, dtype=jnp.dtype(a.dtype)))
    # as bench_search.py: K = 2 for coefficients; SOMF fuses one expert into the safe base
    param, experts = ((Coefficients(k=2, transform="clamp"), [base, base]) if a.mode == "coefficients"
                      else (Masks(k=1, lam=(1.0,)), [base]))
    for t in (int(x) for x in a.lengths.split(",")):
        m = G.search_programs(cfg, base, experts, param, G.SearchSpec(steps=10), a.batch, t)["step"] \
            .compile().memory_analysis()
        peak = m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
        print(f"{a.mode} {a.batch} x {t}: {peak / 2**30:.2f} GiB per device", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
