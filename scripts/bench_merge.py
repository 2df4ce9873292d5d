"""jmerge merge vs mergekit 0.1.5, side by side: process wall time and peak RSS, same inputs.

    python scripts/bench_merge.py [--methods ties task_arithmetic dare_ties slerp]
                                  [--modes stream memory] [--with-1b] [--reps 1]

Inputs (built once under $JMERGE_CACHE/bench): a base and two variants of SmolLM2-135M in bf16,
the variants being the base plus Gaussian noise (5% of each tensor's std, seeds 1 and 2). With
--with-1b, the same for a ~1.1B Llama of random bf16 weights in 1 GB shards.

mergekit lives in its own virtualenv ($MERGEKIT_VENV, default <repo>/.venv-mergekit: the one the
differential tests make, tests/mergekit_ref.py; created on first use with
`pip install mergekit==0.1.5 torch==2.13.0`); it is never a jmerge dependency. Every run is
a fresh process measured by /usr/bin/time -v (wall clock, maximum resident set size). For the
deterministic methods the two outputs are compared tensor by tensor (max |difference|).
"""

from __future__ import annotations

import argparse
import json
import zlib
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
MERGEKIT_VENV = Path(os.environ.get("MERGEKIT_VENV", ROOT / ".venv-mergekit"))
DETERMINISTIC = ("ties", "task_arithmetic", "slerp")

CONFIGS = {
    "ties": """models:
  - {{model: {v1}, parameters: {{density: 0.5, weight: 0.5}}}}
  - {{model: {v2}, parameters: {{density: 0.5, weight: 0.5}}}}
merge_method: ties
base_model: {base}
parameters: {{normalize: true}}
dtype: bfloat16
""",
    "task_arithmetic": """models:
  - {{model: {v1}, parameters: {{weight: 0.5}}}}
  - {{model: {v2}, parameters: {{weight: 0.5}}}}
merge_method: task_arithmetic
base_model: {base}
dtype: bfloat16
""",
    "dare_ties": """models:
  - {{model: {v1}, parameters: {{density: 0.5, weight: 0.5}}}}
  - {{model: {v2}, parameters: {{density: 0.5, weight: 0.5}}}}
merge_method: dare_ties
base_model: {base}
dtype: bfloat16
""",
    "slerp": """models:
  - {{model: {base}}}
  - {{model: {v1}}}
merge_method: slerp
base_model: {base}
parameters: {{t: 0.5}}
dtype: bfloat16
""",
}


# ---------------------------------------------------------------------------- inputs

def _write_model(src_dir: Path, out: Path, tensors, names, shard_bytes: int) -> None:
    """Write (name -> bf16 array) produced lazily by `tensors(name)` as an HF dir."""
    from jmerge.io.safetensors_io import write_file
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shards, cur, size = [], [], 0
    for n, shape, dt in names:
        nb = int(np.prod(shape)) * dt.itemsize
        if cur and size + nb > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append((n, dt, shape))
        size += nb
    shards.append(cur)
    fnames = (["model.safetensors"] if len(shards) == 1 else
              [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for fname, shard in zip(fnames, shards):
        write_file(tmp / fname, shard, (tensors(n) for n, _, _ in shard))
    if len(shards) > 1:
        wmap = {n: f for f, s in zip(fnames, shards) for n, _, _ in s}
        total = sum(int(np.prod(s)) * d.itemsize for _, s, d in names)
        (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                      "weight_map": wmap}))
    conf = json.loads((src_dir / "config.json").read_text()) if (src_dir / "config.json").exists() else {}
    conf["torch_dtype"] = "bfloat16"
    conf.pop("dtype", None)
    (tmp / "config.json").write_text(json.dumps(conf, indent=2))
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (src_dir / f).exists():
            shutil.copy2(src_dir / f, tmp / f)
    os.replace(tmp, out)


def make_family(root: Path, tag: str, src_dir: Path, base_tensor, names, shard_bytes: int) -> dict[str, Path]:
    """base + 2 noisy variants, bf16."""
    import ml_dtypes
    bf16 = np.dtype(ml_dtypes.bfloat16)
    out = {}
    for key, seed in (("base", None), ("v1", 1), ("v2", 2)):
        d = root / f"{tag}-{key}"
        out[key] = d
        if (d / "config.json").exists():
            continue

        def tensor(n, seed=seed):
            x = base_tensor(n).astype(np.float32)
            if seed is not None:
                rng = np.random.default_rng([seed, zlib.crc32(n.encode())])
                x = x + rng.standard_normal(x.shape, dtype=np.float32) * (0.05 * float(x.std()) + 1e-6)
            return x.astype(bf16)

        print(f"building {d} ...", file=sys.stderr)
        _write_model(src_dir, d, tensor, [(n, s, bf16) for n, s in names], shard_bytes)
    return out


def smollm2_inputs(root: Path) -> dict[str, Path]:
    from jmerge.default_model import default_model_dir
    from jmerge.io.safetensors_io import Checkpoint
    src = default_model_dir()
    ck = Checkpoint(src)
    names = [(n, tuple(ck.shape(n))) for n in ck.names()]
    return make_family(root, "smollm2-135m-bf16", src, lambda n: np.asarray(ck.array(n)), names, 5 << 30)


def llama_1b_inputs(root: Path) -> dict[str, Path]:
    hfc = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=32000, hidden_size=2048,
               intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
               rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, max_position_embeddings=2048,
               bos_token_id=1, eos_token_id=2, hidden_act="silu")
    from jmerge.config import from_hf_dict
    from jmerge.io import hf
    cfg = from_hf_dict(hfc)
    src = root / "llama-1.1b-config"
    src.mkdir(parents=True, exist_ok=True)
    (src / "config.json").write_text(json.dumps(hfc))
    names = list(hf.hf_layout(cfg).items())

    def base_tensor(n):
        shape = dict(names)[n]
        rng = np.random.default_rng([0, zlib.crc32(n.encode())])
        if n.endswith("norm.weight"):
            return np.ones(shape, np.float32)
        return rng.standard_normal(shape, dtype=np.float32) * 0.02

    return make_family(root, "llama-1.1b-bf16", src, base_tensor, names, 1 << 30)


# ---------------------------------------------------------------------------- runs

def ensure_mergekit() -> Path:
    exe = MERGEKIT_VENV / "bin" / "mergekit-yaml"
    if exe.exists():
        return exe
    subprocess.run([sys.executable, "-m", "venv", str(MERGEKIT_VENV)], check=True)
    r = subprocess.run([str(MERGEKIT_VENV / "bin" / "pip"), "install", "-q", "torch==2.13.0", "mergekit==0.1.5"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"mergekit install failed (requirements conflict?):\n{r.stderr[-3000:]}")
    return exe


def timed_reps(cmd: list[str], env, reps: int) -> tuple[float, float, str]:
    """timed() `reps` times: (median wall seconds, largest peak RSS, last stderr tail)."""
    runs = [timed(cmd, env) for _ in range(reps)]
    return float(np.median([r[0] for r in runs])), max(r[1] for r in runs), runs[-1][2]


def timed(cmd: list[str], env=None) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in MB, stderr tail) of one fresh process."""
    full = ["/usr/bin/time", "-v", *cmd]
    t = time.perf_counter()
    r = subprocess.run(full, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr)
    return wall, int(m.group(1)) / 1024 if m else float("nan"), r.stderr[-500:]


def compare(a: Path, b: Path) -> tuple[float, str, int, float, int]:
    """(max |a - b|, where, tensors compared, fraction of elements beyond 2 bf16 ulps,
    elements that differ at all)."""
    from jmerge.io.safetensors_io import Checkpoint
    ca, cb = Checkpoint(a), Checkpoint(b)
    worst, where, n, big, total, differ = 0.0, "", 0, 0, 0, 0
    for name in ca.names():
        if name not in cb.where:
            continue
        x = np.asarray(ca.array(name)).astype(np.float32)
        y = np.asarray(cb.array(name)).astype(np.float32)
        d = np.abs(x - y)
        # more than 2 bf16 ulps of the larger value: not a rounding difference
        big += int((d > 2 * 2.0 ** -8 * np.maximum(np.abs(x), np.abs(y))).sum())
        total += d.size
        differ += int((x != y).sum())
        n += 1
        if d.max() > worst:
            worst, where = float(d.max()), name
    return worst, where, n, big / max(total, 1), differ


# ---------------------------------------------------------------------------- tiny differential

TINY_CONFIGS = {
    "linear": "models:\n  - {{model: {base}, parameters: {{weight: 0.3}}}}\n  - {{model: {v1}, parameters: {{weight: 0.7}}}}\nmerge_method: linear\n",
    "task_arithmetic": "models:\n  - {{model: {v1}, parameters: {{weight: 0.6}}}}\n  - {{model: {v2}, parameters: {{weight: [0.2, 0.9]}}}}\n"
                       "merge_method: task_arithmetic\nbase_model: {base}\nparameters: {{lambda: 0.8}}\n",
    "ties": "models:\n  - {{model: {v1}, parameters: {{density: [1, 0.5], weight: 0.6}}}}\n"
            "  - {{model: {v2}, parameters: {{density: 0.5, weight: [{{filter: mlp, value: 0.3}}, {{value: 0.4}}]}}}}\n"
            "merge_method: ties\nbase_model: {base}\n",
    "breadcrumbs": "models:\n  - {{model: {v1}, parameters: {{density: 0.5, gamma: 0.125, weight: 0.5}}}}\n"
                   "  - {{model: {v2}, parameters: {{density: 0.5, gamma: 0.125, weight: 0.5}}}}\nmerge_method: breadcrumbs\nbase_model: {base}\n",
    "breadcrumbs_ties": "models:\n  - {{model: {v1}, parameters: {{density: 0.5, gamma: 0.125, weight: 0.5}}}}\n"
                        "  - {{model: {v2}, parameters: {{density: 0.5, gamma: 0.125, weight: 0.5}}}}\nmerge_method: breadcrumbs_ties\nbase_model: {base}\n",
    "slerp": "models: [{{model: {base}}}, {{model: {v1}}}]\nmerge_method: slerp\nbase_model: {base}\n"
             "parameters:\n  t: [{{filter: self_attn, value: [0, 0.5, 1]}}, {{value: 0.3}}]\n",
    "nuslerp": "models:\n  - {{model: {v1}, parameters: {{weight: 0.3}}}}\n  - {{model: {v2}, parameters: {{weight: 0.7}}}}\nmerge_method: nuslerp\n",
    "nuslerp_base": "models:\n  - {{model: {v1}, parameters: {{weight: 0.3}}}}\n  - {{model: {v2}, parameters: {{weight: 0.7}}}}\n"
                    "merge_method: nuslerp\nbase_model: {base}\nparameters: {{nuslerp_flatten: false}}\n",
    "multislerp": "models:\n  - {{model: {v1}, parameters: {{weight: 0.3}}}}\n  - {{model: {v2}, parameters: {{weight: 0.7}}}}\n"
                  "merge_method: multislerp\nbase_model: {base}\n",
    "karcher": "models: [{{model: {v1}}}, {{model: {v2}}}, {{model: {base}}}]\nmerge_method: karcher\n",
    "model_stock": "models: [{{model: {v1}}}, {{model: {v2}}}]\nmerge_method: model_stock\nbase_model: {base}\n",
    "nearswap": "models: [{{model: {v1}}}]\nmerge_method: nearswap\nbase_model: {base}\nparameters: {{t: 0.005}}\n",
    "sce": "models: [{{model: {v1}}}, {{model: {v2}}}]\nmerge_method: sce\nbase_model: {base}\nparameters: {{select_topk: 0.5}}\n",
    "arcee_fusion": "models: [{{model: {v1}}}]\nmerge_method: arcee_fusion\nbase_model: {base}\n",
}


def tiny_inputs(root: Path) -> dict[str, Path]:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig
    out = {}
    for key, seed in (("base", None), ("v1", 1), ("v2", 2)):
        d = root / f"tiny-f32-{key}"
        out[key] = d
        if (d / "config.json").exists():
            continue
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
        m = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        with torch.no_grad():
            g = torch.Generator().manual_seed(seed or 0)
            for name, p in m.named_parameters():
                if "norm" in name:
                    p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(7)))
                if seed is not None:
                    p.add_(0.01 * torch.randn(p.shape, generator=g))
        m.save_pretrained(d)
    return out


def tiny_diff(work: Path, mk: Path, methods: list[str]) -> None:
    from jmerge.default_model import cache_root
    paths = tiny_inputs(cache_root() / "bench")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    for method in methods:
        cfg = work / f"tiny-{method}.yml"
        cfg.write_text(TINY_CONFIGS[method].format(**{k: str(v) for k, v in paths.items()}))
        a, b = work / f"tiny-{method}-mergekit", work / f"tiny-{method}-jmerge"
        shutil.rmtree(a, ignore_errors=True)
        r = subprocess.run([str(mk), str(cfg), str(a)], capture_output=True, text=True, env=env)
        if r.returncode != 0:
            print(f"{method:18s} mergekit failed: {r.stderr.strip().splitlines()[-1][:150]}", flush=True)
            continue
        r = subprocess.run([PY, "-m", "jmerge.merge_cli", str(cfg), str(b), "--force", "-q"],
                           capture_output=True, text=True, env=env)
        if r.returncode != 0:
            print(f"{method:18s} jmerge failed: {r.stderr.strip()[-300:]}", flush=True)
            continue
        worst, where, n, _, differ = compare(a, b)
        print(f"{method:18s} max|jmerge - mergekit| = {worst:.3g} over {n} tensors, {differ} elements "
              f"differ (worst: {where})", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=list(CONFIGS))
    ap.add_argument("--modes", nargs="+", default=["stream", "memory"], choices=["stream", "memory"])
    ap.add_argument("--with-1b", action="store_true")
    ap.add_argument("--reps", type=int, default=1,
                    help="runs per tool and mode (every tool alike); the median wall time is reported")
    ap.add_argument("--skip-135m", action="store_true")
    ap.add_argument("--no-mergekit", action="store_true")
    ap.add_argument("--compare-only", action="store_true", help="only compare existing outputs")
    ap.add_argument("--tiny-diff", nargs="*", metavar="METHOD",
                    help="differential check against mergekit on tiny float32 models (all methods if none named)")
    args = ap.parse_args()

    from jmerge.default_model import cache_root
    root = cache_root() / "bench"
    work = root / "merge-runs"
    work.mkdir(parents=True, exist_ok=True)
    families = []
    if not args.skip_135m:
        families.append(("SmolLM2-135M bf16 x3", smollm2_inputs(root)))
    if args.with_1b:
        families.append(("Llama-1.1B random bf16 x3", llama_1b_inputs(root)))
    mk = None if args.no_mergekit else ensure_mergekit()
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("XLA_FLAGS", None)

    rows = []
    if args.tiny_diff is not None:
        tiny_diff(work, mk, args.tiny_diff or list(TINY_CONFIGS))
        return
    if args.compare_only:
        for method in DETERMINISTIC:
            print(method, compare(work / f"{method}-mergekit", work / f"{method}-jmerge-{args.modes[0]}"))
        return
    for fam, paths in families:
        # warm the page cache so both tools read from memory
        for p in paths.values():
            for f in p.glob("*.safetensors"):
                f.read_bytes()
        for method in args.methods:
            cfg = work / f"{method}.yml"
            cfg.write_text(CONFIGS[method].format(**{k: str(v) for k, v in paths.items()}))
            res = {}
            if mk is not None:
                out = work / f"{method}-mergekit"
                shutil.rmtree(out, ignore_errors=True)
                res["mergekit"] = timed_reps([str(mk), str(cfg), str(out)], env, args.reps)
            for mode in args.modes:
                out = work / f"{method}-jmerge-{mode}"
                flag = "--stream" if mode == "stream" else "--in-memory"
                cmd = [PY, "-m", "jmerge.merge_cli", str(cfg), str(out), flag, "--force", "-q"]
                if mode == "stream":  # cold: no persistent XLA cache, everything compiled
                    res["jmerge stream cold"] = timed_reps(cmd, dict(env, JMERGE_NO_COMPILE_CACHE="1"),
                                                           args.reps)
                timed(cmd, env)  # fills the persistent compile cache
                res[f"jmerge {mode}"] = timed_reps(cmd, env, args.reps)
            diff = ""
            if mk is not None and method in DETERMINISTIC:
                worst, where, n, frac, _ = compare(work / f"{method}-mergekit", work / f"{method}-jmerge-{args.modes[0]}")
                diff = f"max|diff| {worst:.3g} ({where}, {n} tensors), {frac:.2e} of elements beyond 2 bf16 ulps"
            for tool, (wall, rss, _) in res.items():
                base = res.get("mergekit")
                ratio = f"{base[0] / wall:5.1f}x faster, RSS {rss / base[1]:.2f}x" if base and tool != "mergekit" else ""
                rows.append((fam, method, tool, wall, rss, ratio, diff if tool != "mergekit" else ""))
                print(f"{fam:26s} {method:16s} {tool:15s} {wall:7.1f} s {rss:8.0f} MB  {ratio}  "
                      f"{diff if tool != 'mergekit' else ''}", flush=True)
    (work / "results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
