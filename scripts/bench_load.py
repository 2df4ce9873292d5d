"""Load throughput: safetensors -> device arrays, against a raw read of the same files and
against `safetensors.numpy.load_file`, page cache warm. Prints bytes/s and ratios.

    python scripts/bench_load.py [--model DIR ...] [--with-1b]

Default models: the embedded SmolLM2-135M (float32) and, with --with-1b, a ~1.1B Llama-shaped
checkpoint of random bf16 weights in 1 GB shards (built once under $JMERGE_CACHE/bench).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax


def raw_read(files: list[Path]) -> int:
    n = 0
    for f in files:
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 26):
                n += len(chunk)
    return n


def st_numpy(files: list[Path]) -> int:
    from safetensors.numpy import load_file
    return sum(a.nbytes for f in files for a in load_file(f).values())


def jmerge_load(d: Path) -> int:
    from jmerge.io import load_model
    m = load_model(d)
    jax.block_until_ready(m.params)
    return sum(x.nbytes for x in jax.tree.leaves(m.params))


def best_of(fn, arg, reps=3) -> tuple[float, int]:
    best, n = float("inf"), 0
    for _ in range(reps):
        t = time.perf_counter()
        n = fn(arg)
        best = min(best, time.perf_counter() - t)
    return best, n


def make_1b(root: Path) -> Path:
    d = root / "llama-1.1b-random-bf16"
    if (d / "config.json").exists():
        return d
    import jax.numpy as jnp
    from jmerge.config import from_hf_dict
    from jmerge.io import hf
    from jmerge.models import llama
    hfc = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=32000, hidden_size=2048,
               intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
               rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, max_position_embeddings=2048)
    cfg = from_hf_dict(hfc)
    params = llama.init_params(cfg, 0, jnp.bfloat16)
    hf.save_hf(params, cfg, d, max_shard_size="1GB", progress=True)
    return d


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", action="append", type=Path, default=[])
    p.add_argument("--with-1b", action="store_true")
    a = p.parse_args()
    from jmerge.default_model import cache_root, default_model_dir
    models = a.model or [default_model_dir()]
    if a.with_1b:
        models.append(make_1b(cache_root() / "bench"))
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.device_count()}")
    for d in models:
        files = sorted(d.glob("*.safetensors"))
        raw_read(files)  # warm the page cache
        rows = {"raw read": best_of(raw_read, files), "safetensors.numpy": best_of(st_numpy, files),
                "jmerge load_model": best_of(jmerge_load, d)}
        raw_rate = rows["raw read"][1] / rows["raw read"][0]
        print(f"\n{d.name}: {rows['raw read'][1] / 1e9:.2f} GB in {len(files)} file(s)")
        for name, (t, n) in rows.items():
            rate = n / t
            print(f"  {name:<18} {t:7.2f} s  {rate / 1e9:6.2f} GB/s  {rate / raw_rate:6.1%} of raw")


if __name__ == "__main__":
    main()
