"""`jmerge eval --models M1 M2 --suite safety,overrefusal,domain`: the suites over each model -> a report."""

from __future__ import annotations

import dataclasses
import sys

from jmerge import dryrun
from jmerge.cli import ArgumentParser, quiet_jax
from jmerge.errors import JmergeError
from jmerge.eval.judges import REFUSAL_JUDGES


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="jmerge eval", description="Evaluate models: safety, over-refusal, domain.")
    p.add_argument("--models", nargs="+", required=True, help="model directories / .gguf files / BASE+ADAPTER")
    p.add_argument("--suite", default="safety,overrefusal,domain",
                   help="comma-separated: safety, overrefusal, domain (default: all three)")
    p.add_argument("--judge", metavar="MODEL", help="judge model (Llama-Guard style) for the unsafe rate")
    p.add_argument("--judge-template", default="llamaguard",
                   help="'llamaguard' (default), 'chat' (the judge tokenizer's template), or a FILE "
                        "with {prompt} and {response}")
    p.add_argument("--refusal-judge", choices=REFUSAL_JUDGES, default="keyword",
                   help="refusal judge of the safety and over-refusal suites: keyword rules (default) or "
                        "the learnt classifier over SmolLM2 hidden states")
    p.add_argument("--safety-prompts", default="harmbench",
                   help="harmful prompts: built-in source (test split) or file (default: harmbench)")
    p.add_argument("--field", help="CSV column / JSON field of --safety-prompts")
    p.add_argument("--category-field", help="CSV column / JSON field with each prompt's category")
    p.add_argument("--data", help="directory with xstest/ and pubmedqa/ (default: $JMERGE_DATA)")
    p.add_argument("--domain", action="append", metavar="FILE.jsonl",
                   help="domain task: JSONL question/choices/answer (multiple choice) or "
                        "question/answer (numeric); repeatable; default: pubmedqa")
    p.add_argument("--context-tokens", type=int, default=512, help="context budget for multiple choice")
    p.add_argument("--limit", type=int, help="only the first N prompts/items of each set")
    p.add_argument("--out", default="eval-report", help="report directory (default: eval-report)")
    p.add_argument("--force", action="store_true", help="replace an existing report directory")
    p.add_argument("--mesh", help="e.g. fsdp=4,tensor=2 (default: all devices on fsdp)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="compute dtype")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--chat-template", metavar="FILE", help="Jinja chat template for the evaluated models")
    p.add_argument("--no-chat-template", action="store_true", help="feed prompts as raw text")
    p.add_argument("--system", help="system message for the chat template")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    dryrun.add_flags(p, prompt_tokens="dry run: the longest prompt in tokens, chat template included")
    return p


def main(argv=None) -> int:
    quiet_jax()
    a = parser().parse_args(argv)
    from jmerge.eval.run import EvalOptions, evaluate_models
    from jmerge.eval.suites import parse_suites

    suites = parse_suites(a.suite)
    for name in ("max-new-tokens", "batch-size", "limit", "context-tokens", "bootstrap"):
        value = getattr(a, name.replace("-", "_"))
        if value is not None and value <= 0:
            raise JmergeError(f"--{name} must be > 0, got {value}")
    if a.chat_template and a.no_chat_template:
        raise JmergeError("--chat-template and --no-chat-template exclude each other")
    if a.domain and "domain" not in suites:
        raise JmergeError("--domain given but the domain suite is not selected (add it to --suite)")
    if a.judge and "safety" not in suites:
        raise JmergeError("--judge given but the safety suite is not selected (add it to --suite)")
    if dryrun.wanted(a):
        return dryrun.run("eval", a, argv)
    flags = {f.name: getattr(a, f.name) for f in dataclasses.fields(EvalOptions) if f.name != "suites"}
    out, files = evaluate_models(EvalOptions(suites=suites, **flags), on_model=_print_summary)
    print(f"report -> {out}/ ({', '.join(f.name for f in files.values())})", file=sys.stderr)
    return 0


def _print_summary(entry: dict) -> None:
    from jmerge.eval.report import headline
    parts = []
    for col, v in headline(entry).items():
        parts.append(f"{col} {v['mean']:.3f} [{v['lo']:.3f}, {v['hi']:.3f}]" if isinstance(v, dict)
                     else f"{col} {v:.3f}")
    print(f"{entry['name']}: " + "; ".join(parts), file=sys.stderr)
