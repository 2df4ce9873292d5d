"""Benchmark: `jmerge generate` end to end, cold and warm, against a plain transformers script.

Each side is a fresh process timed from launch to exit, on the same prompts (chat-formatted
HarmBench by default, written to one text file both read), greedy, the same EOS ids, one batch.
Cold: an empty compile cache (a fresh `$JMERGE_CACHE`); warm: the same cache again. The runs
alternate (transformers, cold, warm, transformers, warm, ...) so a change in machine load hits
both sides; the best of each is compared. Prints each run, the load average, the ratios and
whether the greedy tokens are identical.

    python scripts/bench_startup.py [--n 64] [--new 64] [--batch 64] [--repeats 2] [--model DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The plain script: what a user of transformers would write for the same job.
TRANSFORMERS = r"""
import json, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model_dir, prompts, new, eos, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4]), sys.argv[5]
tok = AutoTokenizer.from_pretrained(model_dir)
texts = open(prompts).read().splitlines()
ids = [tok(tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True),
           add_special_tokens=False)["input_ids"] for t in texts]
width = max(map(len, ids))
batch = torch.tensor([[0] * (width - len(p)) + p for p in ids])
mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ids])
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
with torch.no_grad():
    gen = model.generate(batch, attention_mask=mask, max_new_tokens=new, do_sample=False, eos_token_id=eos,
                         pad_token_id=0)
rows = [next((r[:i] for i, t in enumerate(r) if t in eos), r) for r in gen[:, width:].tolist()]
json.dump(rows, open(out, "w"))
"""


def timed(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="HF directory (default: the converted SmolLM2 in the cache)")
    p.add_argument("--n", type=int, default=64, help="prompts (HarmBench, in order)")
    p.add_argument("--new", type=int, default=64, help="new tokens per prompt")
    p.add_argument("--batch", type=int, default=64, help="jmerge --batch-size")
    p.add_argument("--repeats", type=int, default=2, help="warm jmerge and transformers runs each")
    a = p.parse_args()
    if a.repeats < 1:
        p.error("--repeats must be >= 1")

    from jmerge import generate as G
    from jmerge.config import load_config
    from jmerge.default_model import cached_default_dir
    from jmerge.eval.prompts import load_builtin

    model = a.model or cached_default_dir()
    if model is None:
        print("SmolLM2 not in the cache: run `jmerge default-model` first", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="bench_startup_"))
    prompts = work / "prompts.txt"
    prompts.write_text("\n".join(q.text for q in load_builtin("harmbench")[: a.n]) + "\n")
    eos = sorted(G.default_eos_ids(load_config(model), G.load_tokenizer(model), model))
    niced = ["nice", "-n", "5", sys.executable]
    jm_out, tf_out = work / "jmerge.jsonl", work / "transformers.json"
    jmerge = niced + ["-m", "jmerge", "generate", "--model", str(model), "--prompts", str(prompts),
                      "--max-new-tokens", str(a.new), "--batch-size", str(a.batch), "--out", str(jm_out), "--force"]
    transformers = niced + ["-c", TRANSFORMERS, str(model), str(prompts), str(a.new), json.dumps(eos), str(tf_out)]
    env = dict(os.environ, JMERGE_CACHE=str(work / "cache"), TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("JMERGE_NO_COMPILE_CACHE", None)

    print(f"{a.n} prompts x {a.new} greedy tokens, jmerge batch {a.batch}, model {model}; "
          f"cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}", flush=True)
    times: dict[str, list[float]] = {"transformers": [], "jmerge cold": [], "jmerge warm": []}
    for what in ["transformers", "jmerge cold", "jmerge warm"] + ["transformers", "jmerge warm"] * (a.repeats - 1):
        t = timed(transformers if what == "transformers" else jmerge, env)
        times[what].append(t)
        print(f"  {what:<13} {t:6.2f} s   (load average {os.getloadavg()[0]:.1f})", flush=True)

    ours = [json.loads(line)["tokens"] for line in jm_out.read_text().splitlines()]
    theirs = json.loads(tf_out.read_text())
    same = sum(x == y for x, y in zip(ours, theirs))
    best = {k: min(v) for k, v in times.items() if v}
    print(f"greedy tokens identical: {same}/{len(ours)} rows")
    for what in ("jmerge cold", "jmerge warm"):
        if what in best:
            print(f"transformers / {what}: {best['transformers'] / best[what]:.2f}x "
                  f"({best['transformers']:.2f} s / {best[what]:.2f} s; goal for warm >= 2x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
