"""`jmerge data synth`: One-Bad-Model synthetic training data as JSONL."""

from __future__ import annotations

import sys
from pathlib import Path

from jmerge.cli import ArgumentParser, quiet_jax
from jmerge.errors import JmergeError


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="jmerge data", description="Synthetic training data (One Bad Model, step i).")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("synth", help="harmful->refusal, benign->helpful, domain->expert pairs as JSONL")
    s.add_argument("--out", required=True, help="output JSONL: {prompt, response, source, split}")
    s.add_argument("--force", action="store_true", help="replace --out if it exists (never an input)")
    s.add_argument("--harmful", action="append", default=[],
                   help="harmful prompt source: harmbench, donotanswer, advbench or a file (repeatable)")
    s.add_argument("--aligned", help="aligned model whose refusals are kept (default: template refusals)")
    s.add_argument("--benign", type=int, default=0, help="number of code-generated benign prompts to answer")
    s.add_argument("--benign-prompts", help="file of benign prompts instead of the code-generated set")
    s.add_argument("--model", help="model answering the benign prompts (default: the embedded SmolLM2)")
    s.add_argument("--finance", type=int, default=0, help="number of finance items (domain data)")
    s.add_argument("--expert", help="domain expert model (default: the code-generated expert answers)")
    s.add_argument("--split", choices=("train", "test", "all"), default="train",
                   help="which split of the prompts to write (default: train)")
    s.add_argument("--test-frac", type=float, default=0.2)
    s.add_argument("--data", help="file or directory for advbench (or $JMERGE_DATA)")
    s.add_argument("--max-new-tokens", type=int, default=96)
    s.add_argument("--batch-size", type=int, default=16)
    s.add_argument("--seed", type=int, default=0)
    return p


def main(argv=None) -> int:
    quiet_jax()
    a = parser().parse_args(argv)
    if a.benign < 0 or a.finance < 0:
        raise JmergeError("--benign and --finance must be >= 0")
    if a.max_new_tokens <= 0 or a.batch_size <= 0:
        raise JmergeError("--max-new-tokens and --batch-size must be > 0")
    if not 0 < a.test_frac < 1:
        raise JmergeError(f"--test-frac must be in (0, 1), got {a.test_frac}")
    if a.aligned and not a.harmful:
        raise JmergeError("--aligned needs harmful prompts (--harmful SOURCE)")
    if a.expert and not a.finance:
        raise JmergeError("--expert needs domain items (--finance N)")
    if not (a.harmful or a.benign or a.benign_prompts or a.finance):
        raise JmergeError("nothing to synthesise: give --harmful, --benign N, --benign-prompts or --finance N")
    for m in (a.aligned, a.model, a.expert):
        if m and not Path(m).exists():
            raise JmergeError(f"{m}: no such model directory or file")
    from jmerge.synth import synthesise
    n = synthesise(a.out, harmful=a.harmful, aligned=a.aligned, benign=a.benign, benign_file=a.benign_prompts,
                   model=a.model, finance=a.finance, expert=a.expert, split=a.split, test_frac=a.test_frac,
                   data=a.data, max_new_tokens=a.max_new_tokens, batch_size=a.batch_size, seed=a.seed,
                   force=a.force)
    print(f"{n} records -> {a.out}", file=sys.stderr)
    return 0
