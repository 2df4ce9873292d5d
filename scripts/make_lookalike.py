"""Rebuild configs/data/lookalike_base.jsonl: the base model's greedy answers to the look-alike
prompts (benign questions with dangerous-sounding words), keeping only rows the keyword judge
does not call a refusal, as {prompt, response, source: "lookalike:base"} search pairs; and from
them configs/data/lookalike_prefs.jsonl, preference triples for a search's `prefer:` DPO term:
chosen = the base's answer, rejected = one of the testbed's refusal openings (in turn), the
over-refusal a safety merge should not make.

    python scripts/make_lookalike.py [--model DIR]   (default: the SmolLM2 testbed base)
    python scripts/make_lookalike.py --prefs-only    (the triples from the committed answers)
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from jmerge.default_model import cache_root
from jmerge.eval.judges import is_refusal
from jmerge.synth import _OPENINGS as REFUSALS  # the testbed's own refusal wording
from jmerge.synth import write_jsonl

DATA = Path(__file__).resolve().parents[1] / "configs" / "data"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(cache_root() / "models" / "SmolLM2-135M-Instruct"))
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--prefs-only", action="store_true")
    a = ap.parse_args()
    if not a.prefs_only:
        answer(a.model, a.max_new_tokens)
    rows = [json.loads(line) for line in (DATA / "lookalike_base.jsonl").read_text().splitlines()]
    prefs = [dict(prompt=r["prompt"], chosen=r["response"], rejected=REFUSALS[i % len(REFUSALS)],
                  source="lookalike:prefer") for i, r in enumerate(rows)]
    write_jsonl(prefs, DATA / "lookalike_prefs.jsonl")
    print(f"{len(prefs)} preference triples -> {DATA / 'lookalike_prefs.jsonl'}")
    return 0


def answer(model: str, max_new_tokens: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "answers.jsonl"
        subprocess.run([sys.executable, "-m", "jmerge", "generate", "--model", model, "--prompts",
                        str(DATA / "lookalike_prompts.txt"), "--max-new-tokens", str(max_new_tokens),
                        "--out", str(out)], check=True)
        rows = [json.loads(line) for line in out.read_text().splitlines()]
    keep = [dict(prompt=r["prompt"], response=r["response"], source="lookalike:base")
            for r in rows if not is_refusal(r["response"])]
    write_jsonl(keep, DATA / "lookalike_base.jsonl")
    print(f"{len(keep)} of {len(rows)} answers kept (the rest were refusals) -> {DATA / 'lookalike_base.jsonl'}")


if __name__ == "__main__":
    sys.exit(main())
