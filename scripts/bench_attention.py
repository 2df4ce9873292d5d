"""Attention: compiled memory of a Llama-3-8B layer's fwd+bwd, and CPU timings of the kernel.

`memory`: one decoder layer of configs/shapes/llama-3-8b (bf16, remat as the search runs it) at
batch x seq tokens, gradient of the hidden states' sum w.r.t. all params, or with `--cache` a
generation prefill; prints the compiled program's memory analysis (nothing is allocated).
`--block 1000000` gives the dense formula's numbers. `speed`: the dense formula against the blocked
kernel at SmolLM2's head shapes (9 heads, 3 KV heads, 64 wide), forward and forward+backward, and
a decode step against a long cache. `fused`: on this backend, bf16 attention as the model calls it
(cuDNN on a GPU where it fits) and the jnp kernel forced, errors against float32 and timings.

    python scripts/bench_attention.py memory [--batch 8] [--seq 2048] [--cache 0] [--block 512]
    python scripts/bench_attention.py speed
    python scripts/bench_attention.py fused [--batch 8] [--seq 2048]   # on a GPU: cuDNN vs jnp
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jmerge.config import from_hf_dict, load_config
from jmerge.models import attention as A
from jmerge.models import llama

ROOT = Path(__file__).resolve().parent.parent


def memory(batch: int, seq: int, cache: int):
    cfg = load_config(ROOT / "configs/shapes/llama-3-8b/config.json")
    cfg = dataclasses.replace(cfg, num_layers=1, layer_windows=(0,))
    params = jax.eval_shape(lambda: llama.init_params(cfg, dtype=jnp.bfloat16))
    ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    if cache:
        kv = jax.eval_shape(lambda: llama.init_cache(cfg, batch, cache, jnp.bfloat16))
        fn = jax.jit(lambda p, i, c: llama.forward(p, cfg, i, cache=c, last_only=True))
        m, what = fn.lower(params, ids, kv).compile().memory_analysis(), f"prefill into a {cache}-slot cache"
    else:
        def loss(p, i):
            return llama.forward(p, cfg, i, return_hidden=True, remat=True).astype(jnp.float32).sum()

        m, what = jax.jit(jax.grad(loss)).lower(params, ids).compile().memory_analysis(), "fwd+bwd"
    gib = 2.0 ** 30
    print(f"Llama-3-8B, 1 layer, bf16, {batch} x {seq} tokens, {what}, block {A.BLOCK}: arguments "
          f"{m.argument_size_in_bytes / gib:.2f} GiB, outputs {m.output_size_in_bytes / gib:.2f} GiB, "
          f"temporaries {m.temp_size_in_bytes / gib:.2f} GiB ({m.temp_size_in_bytes:,} B)")


def _best(fns: dict, *args, rounds=5) -> dict:
    """Milliseconds per call, the best of interleaved rounds (a shared machine's load moves both)."""
    for fn in fns.values():
        jax.block_until_ready(fn(*args))
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, fn in fns.items():
            t = time.perf_counter()
            jax.block_until_ready(fn(*args))
            best[name] = min(best[name], (time.perf_counter() - t) * 1e3)
    return best


def speed():
    h, kv, d = 9, 3, 64
    r = np.random.RandomState(0)

    def run(b, t, s, start, grad):
        q = jnp.asarray(r.randn(b, t, h, d), jnp.float32)
        k, v = (jnp.asarray(r.randn(b, s, kv, d), jnp.float32) for _ in range(2))
        mask = jnp.ones((b, s), jnp.int32)
        fns = {}
        for name, block in (("dense", 1 << 30), ("blocked", A.BLOCK)):
            def f(q, k, v, block=block):
                out = A.attention(q, k, v, start=start, window=0, key_mask=mask, scale=d ** -0.5, block=block)
                return out.sum()
            fns[name] = jax.jit(jax.grad(f, argnums=(0, 1, 2)) if grad else f)
        res = _best(fns, q, k, v)
        what = "fwd+bwd" if grad else "fwd"
        print(f"  {b} x {t} queries, {s} keys, {what}: dense {res['dense']:.1f} ms, "
              f"blocked {res['blocked']:.1f} ms")

    print(f"jax {jax.__version__}, backend {jax.default_backend()}, SmolLM2 heads ({h} q, {kv} kv, {d} wide):")
    run(16, 512, 512, 0, False)
    run(2, 2048, 2048, 0, False)
    run(2, 2048, 2048, 0, True)
    run(16, 1, 2048, 1024, False)
    run(16, 1, 2048, 2047, False)
    decode()


SMOLLM2 = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=576, intermediate_size=1536,
               num_attention_heads=9, num_key_value_heads=3, num_hidden_layers=30, vocab_size=49152,
               rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True, max_position_embeddings=8192)


def decode(batch=16, length=2048, slot=1800):
    """One SmolLM2-shaped decode step (random weights) against a long cache, dense vs blocked."""
    cfg = from_hf_dict(SMOLLM2)
    params = llama.init_params(cfg)
    cache = llama.init_cache(cfg, batch, length)
    cache["index"] = jnp.asarray(slot, jnp.int32)
    cache["mask"] = jnp.ones((batch, length), jnp.int32).at[:, slot:].set(0)
    ids = jnp.zeros((batch, 1), jnp.int32)
    fns = {}
    for name, block in (("dense", 1 << 30), ("blocked", A.BLOCK)):
        A.BLOCK = block  # read while tracing, so each jit keeps its own
        fns[name] = jax.jit(lambda p, i, c: llama.forward(p, cfg, i, cache=c, last_only=True)[0])
        jax.block_until_ready(fns[name](params, ids, cache))
    res = _best(fns, params, ids, cache)
    print(f"  SmolLM2 decode step, batch {batch}, cache {length} at slot {slot}: dense {res['dense']:.1f} ms, "
          f"blocked {res['blocked']:.1f} ms")


def fused(batch: int, seq: int):
    """bf16 attention as the model calls it (cuDNN where it fits) and the jnp kernel forced, each
    against a float32 dense reference, then fwd+bwd timings at Llama-3-8B's heads."""
    h, kv, d = 32, 8, 128
    r = np.random.RandomState(0)
    lengths = np.full(batch, seq)
    lengths[0] = seq // 3
    cases = {"right padding": (lengths, False, 0), "right padding, window 256": (lengths, False, 256),
             "left padding": (lengths, True, 0)}
    q = jnp.asarray(r.randn(batch, seq, h, d), jnp.bfloat16)
    k, v = (jnp.asarray(r.randn(batch, seq, kv, d), jnp.bfloat16) for _ in range(2))
    cot = jnp.asarray(r.randn(batch, seq, h, d), jnp.float32)
    portable = A.use_cudnn
    for name, (n, left, window) in cases.items():
        mask = jnp.asarray(np.arange(seq)[None] >= seq - n[:, None] if left else np.arange(seq)[None] < n[:, None])
        seen = jnp.asarray(mask if left else np.arange(seq)[None] < n[:, None])[:, :, None, None]

        def run(q, k, v, window=window, mask=mask):
            out = A.attention(q, k, v, start=0, window=window, key_mask=mask, scale=d ** -0.5)
            return jnp.sum(out.astype(jnp.float32) * cot * seen)

        ref = jax.jit(jax.value_and_grad(lambda *x: run(*(y.astype(jnp.float32) for y in x)), (0, 1, 2)))
        want = ref(q, k, v)
        fns = {}
        for path in ("dispatch", "jnp"):
            A.use_cudnn = portable if path == "dispatch" else (lambda *a: False)
            fns[path] = jax.jit(jax.value_and_grad(run, (0, 1, 2)))
            got = fns[path](q, k, v)
            err = [float(jnp.max(jnp.abs(a.astype(jnp.float32) - b)) / (jnp.max(jnp.abs(b)) + 1e-9))
                   for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want))]
            print(f"  {name}, {path}: relative error loss {err[0]:.1e}, dq {err[1]:.1e}, dk {err[2]:.1e}, "
                  f"dv {err[3]:.1e}")
        A.use_cudnn = portable
        ms = _best(fns, q, k, v, rounds=3)
        flops = 4 * batch * h * seq * seq * d / 2 * 3.5  # causal half; fwd + bwd ~ 3.5 forward matmuls
        print(f"  {name}: fwd+bwd dispatch {ms['dispatch']:.1f} ms ({flops / ms['dispatch'] / 1e9:.0f} TFLOP/s), "
              f"jnp {ms['jnp']:.1f} ms ({flops / ms['jnp'] / 1e9:.0f} TFLOP/s)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=("memory", "speed", "fused"))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--cache", type=int, default=0, help="memory of a prefill into a cache this long")
    ap.add_argument("--block", type=int, default=A.BLOCK, help="tile size (a huge one: the dense formula)")
    a = ap.parse_args()
    A.BLOCK = a.block
    if a.what == "memory":
        memory(a.batch, a.seq, a.cache)
    elif a.what == "fused":
        print(f"jax {jax.__version__}, backend {jax.default_backend()}, bf16, {a.batch} x {a.seq}, 32 q / 8 kv heads:")
        fused(a.batch, a.seq)
    else:
        speed()


if __name__ == "__main__":
    main()
