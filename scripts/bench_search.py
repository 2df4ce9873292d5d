"""Search step time against a plain forward+backward of one model at the same batch; peak memory
against (K + 1) x model size; model FLOPs utilisation on an accelerator.

    python scripts/bench_search.py [--shape smollm2|1b] [--dtype bfloat16] [--batch 8] [--seq 256]
                                   [--k 2] [--repeats 5] [--modes plain coefficients masks]

Random weights of the named shape (SmolLM2-135M or a TinyLlama-like 1.1B), K experts = base +
noise. Each mode runs in a fresh process so its peak memory is its own:
  plain         value_and_grad of the response CE w.r.t. every weight of one model (the peer:
                what one SFT step costs before the optimizer);
  coefficients  one step of the coefficient search (λ per task vector x layer), merge inside the
                graph, layer by layer under jax.checkpoint, adam update included;
  masks         one step of the SOMF mask search (one mask logit per element, shared by the K
                task vectors, relaxed Bernoulli), adam update included.
Peak memory: the device's peak_bytes_in_use on GPU/TPU, the process's max RSS on CPU.
MFU: model FLOPs (6 x matmul weights x tokens + 12 x layers x width x seq x tokens for attention)
over the step time and the chip's dense bf16 peak (H100/H200: 989 TFLOP/s).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SHAPES = {
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True, rope_theta=100000.0),
    "1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
               num_attention_heads=32, num_key_value_heads=4, tie_word_embeddings=False, rope_theta=10000.0),
}
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def model_config(shape: str):
    from jmerge.config import from_hf_dict
    hfc = dict(architectures=["LlamaForCausalLM"], model_type="llama", rms_norm_eps=1e-5,
               max_position_embeddings=8192, hidden_act="silu", **SHAPES[shape])
    return from_hf_dict(hfc)


def model_flops(cfg, params, batch: int, seq: int) -> float:
    """Training FLOPs of one fwd+bwd: 6 per matmul weight per token (the LM head counts, the
    embedding lookup does not) plus attention scores and values."""
    import jax
    layers = sum(x.size for x in jax.tree.leaves(params["model"]["layers"]) if x.ndim == 3)
    head = cfg.vocab_size * cfg.hidden_size
    tokens = batch * seq
    return 6.0 * (layers + head) * tokens + 12.0 * cfg.num_layers * cfg.hidden_size * seq * tokens


def peak_memory() -> tuple[int, str]:
    import jax
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "device peak"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process max RSS"


def one_mode(a) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jmerge.models import llama
    from jmerge.objectives import hidden
    from jmerge.search import gradient as G
    from jmerge.search.merged import weighted_ce
    from jmerge.search.parametrisations import Coefficients, Masks

    cfg = model_config(a.shape)
    dtype = jnp.dtype(a.dtype)
    base = jax.jit(lambda: llama.init_params(cfg, seed=0, dtype=dtype))()
    nbytes = sum(x.nbytes for x in jax.tree.leaves(base))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size, (a.batch, a.seq)).astype(np.int32)
    loss_mask = np.zeros((a.batch, a.seq), np.float32)
    loss_mask[:, a.seq // 2:] = 1
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": loss_mask,
             "weight": loss_mask / loss_mask.sum()}
    batch = jax.device_put(batch)
    key = jax.random.PRNGKey(0)

    if a.mode == "plain":
        @jax.jit
        def step(p, batch):
            return jax.value_and_grad(lambda p: weighted_ce(hidden(p, cfg, batch["input_ids"],
                                                                     batch["attention_mask"]), batch))(p)
        run = lambda: step(base, batch)  # noqa: E731
    else:
        def noisy(i):
            return jax.jit(lambda b: jax.tree.map(
                lambda x: x + (0.01 * jax.random.normal(jax.random.fold_in(key, i), x.shape)).astype(x.dtype), b))(base)
        experts = [noisy(i + 1) for i in range(a.k)]
        if a.mode == "coefficients":
            param = Coefficients(k=a.k, transform="clamp")
            theta0 = param.theta0(cfg.num_layers)
        else:
            param = Masks(k=1, lam=(1.0,))
            theta0 = param.theta0(base)
            experts = experts[:1]  # SOMF: the safe model is the base of the fusion; one other expert
        search = G.GradientSearch(cfg, base, experts, param, G.SearchSpec(steps=1 << 30, lr=1e-2), theta0)
        del experts
        state = {"theta": search.theta, "opt": search.opt_state}

        def run():
            state["theta"], state["opt"], loss = G._step(state["theta"], state["opt"], search.base, search.tvs, batch,
                                                          key, cfg=cfg, param=param, spec=search.spec)
            return loss

    t0 = time.perf_counter()
    jax.block_until_ready(run())
    first = time.perf_counter() - t0
    times = []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(run())
        times.append(time.perf_counter() - t0)
    peak, how = peak_memory()
    return {"mode": a.mode, "step_s": float(np.median(times)), "first_s": first, "peak_bytes": peak,
            "peak_kind": how, "model_bytes": nbytes, "flops": model_flops(cfg, base, a.batch, a.seq),
            "device": jax.devices()[0].device_kind, "backend": jax.default_backend()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="smollm2")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--modes", nargs="+", default=["plain", "coefficients", "masks"])
    ap.add_argument("--mode", help=argparse.SUPPRESS)  # one mode, in the child process
    a = ap.parse_args(argv)
    if a.mode:
        print(json.dumps(one_mode(a)))
        return 0

    import jax
    print(f"shape {a.shape}, {a.dtype}, batch {a.batch} x {a.seq}, K={a.k}; jax {jax.__version__} "
          f"{jax.default_backend()}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus", flush=True)
    results = {}
    for mode in a.modes:
        cmd = [sys.executable, __file__, "--mode", mode, "--shape", a.shape, "--dtype", a.dtype,
               "--batch", str(a.batch), "--seq", str(a.seq), "--k", str(a.k), "--repeats", str(a.repeats)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            print(f"{mode}: failed\n{r.stderr[-3000:]}", flush=True)
            continue
        res = json.loads(r.stdout.strip().splitlines()[-1])
        results[mode] = res
        gb = res["model_bytes"] / 1e9
        line = (f"{mode:13s} step {res['step_s'] * 1e3:9.1f} ms (first call {res['first_s']:.1f} s)  "
                f"{res['peak_kind']} {res['peak_bytes'] / 1e9:6.2f} GB = {res['peak_bytes'] / res['model_bytes']:.2f} x model "
                f"({gb:.2f} GB); (K+1) x model = {(a.k + 1) * gb:.2f} GB")
        peak = next((v for k, v in PEAK_BF16.items() if k in res["device"]), None)
        if res["backend"] == "gpu" and peak:
            line += f"  MFU {res['flops'] / res['step_s'] / peak * 100:.1f}% of {peak / 1e12:.0f} TFLOP/s"
        if "plain" in results and mode != "plain":
            line += f"  ratio to plain {res['step_s'] / results['plain']['step_s']:.2f}x (goal <= 1.3x)"
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
