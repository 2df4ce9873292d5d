"""CMA-ES (`evolve`) candidates per minute, against one plain forward pass of one model at the
same batch (the peer: what scoring a candidate would cost if merging were free).

    python scripts/bench_evolve.py [--shape tiny|smollm2] [--layers N] [--method ties] [--batch 4]
                                   [--seq 64] [--batches 1] [--popsize 8] [--generations 3]

Random weights (SmolLM2-135M's width, or a tiny model), K = 2 experts = base + noise. A candidate
is one merged model built inside the graph from per-layer method parameters (weight, density)
and scored on `batches` batches; every generation after compilation is timed, CMA-ES's own
ask/tell included. Also timed, interleaved with the peer so a shared machine's load hits both
alike: scoring one candidate on one batch, and the merge alone (materialising the merged params).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SHAPES = {
    "tiny": dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True, rope_theta=100000.0),
}


def interleaved_seconds(fns: dict, repeats: int) -> dict:
    """Median seconds of each function, timed in turn so that a shared machine's changing load
    weighs on all of them alike."""
    import jax
    import numpy as np
    for fn in fns.values():
        jax.block_until_ready(fn())  # compile
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[k].append(time.perf_counter() - t0)
    return {k: float(np.median(v)) for k, v in times.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="smollm2")
    ap.add_argument("--layers", type=int, help="override the shape's layer count")
    ap.add_argument("--method", default="ties")
    ap.add_argument("--params", nargs="+", default=["weight", "density"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batches", type=int, default=1, help="batches scored per candidate")
    ap.add_argument("--popsize", type=int, default=8)
    ap.add_argument("--generations", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args(argv)

    import jax
    import numpy as np

    from jmerge.config import from_hf_dict
    from jmerge.models import llama
    from jmerge.search.gradient import batch_loss, mixed_batch
    from jmerge.search.merged import materialise, task_vectors
    from jmerge.search.parametrisations import MethodSettings
    from jmerge.search.population import EvolveSpec, evolve

    shape = dict(SHAPES[a.shape], **({"num_hidden_layers": a.layers} if a.layers else {}))
    cfg = from_hf_dict(dict(architectures=["LlamaForCausalLM"], model_type="llama", rms_norm_eps=1e-5,
                            max_position_embeddings=8192, hidden_act="silu", **shape))
    base = jax.jit(lambda: llama.init_params(cfg, seed=0))()
    key = jax.random.PRNGKey(0)
    experts = [jax.jit(lambda b, i=i: jax.tree.map(
        lambda x: x + 0.01 * jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype), b))(base)
        for i in (1, 2)]
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(a.batches):
        ids = rng.integers(1, cfg.vocab_size, (a.batch, a.seq)).astype(np.int32)
        loss = np.zeros_like(ids)
        loss[:, a.seq // 2:] = 1
        batches.append(mixed_batch([({"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": loss}, 1.0)]))

    param = MethodSettings(a.method, 2, tuple(a.params))
    init = {"weight": 0.5, "density": 1.0, "t": 0.5}
    tvs = task_vectors(base, experts)
    theta0 = param.theta0(cfg.num_layers, init)
    fwd = jax.jit(lambda p, b: llama.forward(p, cfg, b["input_ids"], b["attention_mask"]))
    make = jax.jit(materialise, static_argnames=("param",))
    t = interleaved_seconds({
        "forward": lambda: fwd(base, batches[0]),  # the peer
        "score": lambda: batch_loss(theta0, base, tvs, batches[0], key, cfg=cfg, param=param),
        "merge": lambda: make(base, tvs, theta0, param=param, key=key),
    }, a.repeats)

    log = []
    t0 = time.perf_counter()
    evolve(cfg, base, experts, param, init, batches,
           EvolveSpec(generations=a.generations, popsize=a.popsize), progress=False, log=log)
    total = time.perf_counter() - t0
    # evolve scores the initial point (compiling) before generation 1, so every generation is warm.
    per_min = float(np.median([r["candidates_per_minute"] for r in log]))
    per_candidate = 60.0 / per_min
    n = sum(x.size for x in jax.tree.leaves(base))
    print(f"model {a.shape} ({cfg.num_layers} layers, {n / 1e6:.1f}M params), K=2, method {a.method} "
          f"{'/'.join(a.params)}, batch {a.batch}x{a.seq}, {a.batches} batch(es) per candidate, "
          f"popsize {a.popsize}, {a.generations} generations ({total:.1f} s incl. compile), "
          f"backend {jax.default_backend()}")
    print(f"evolve: {per_min:.1f} candidates/min ({per_candidate * 1e3:.1f} ms per candidate, CMA-ES included)")
    print(f"peer: one plain forward {t['forward'] * 1e3:.1f} ms; scoring one candidate on one batch (merge in "
          f"the graph + forward + loss) {t['score'] * 1e3:.1f} ms; the merge alone, materialised "
          f"{t['merge'] * 1e3:.1f} ms")
    print(f"per candidate / plain forward: {per_candidate / t['forward']:.2f}x (per batch scored: "
          f"{per_candidate / a.batches / t['forward']:.2f}x); one-batch score / plain forward, "
          f"interleaved: {t['score'] / t['forward']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
