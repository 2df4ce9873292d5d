"""`jmerge generate --model DIR --prompts SPEC`: a prompt set's responses as JSONL."""

from __future__ import annotations

import sys

from jmerge import dryrun
from jmerge.cli import ArgumentParser, quiet_jax
from jmerge.errors import JmergeError


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="jmerge generate", description="Generate responses to a prompt set (JSONL out).")
    p.add_argument("--model", required=True, help="model directory (HF, orbax), .gguf file, or BASE+ADAPTER")
    p.add_argument("--prompts", required=True, help="prompt file (.txt/.csv/.json/.jsonl) or built-in source")
    p.add_argument("--field", help="CSV column / JSON field holding the prompt")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--mesh", help="e.g. fsdp=4,tensor=2 (default: all devices on fsdp)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="compute dtype (default: the checkpoint's)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--system", help="system message for the chat template")
    p.add_argument("--chat-template", metavar="FILE", help="Jinja chat template to use instead of the tokenizer's")
    p.add_argument("--no-chat-template", action="store_true", help="feed prompts as raw text")
    p.add_argument("--limit", type=int, help="only the first N prompts")
    p.add_argument("--out", help="output JSONL (default: stdout)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists (never an input)")
    dryrun.add_flags(p, prompt_tokens="dry run: the longest prompt in tokens, chat template included")
    return p


def main(argv=None) -> int:
    quiet_jax()
    a = parser().parse_args(argv)
    if a.max_new_tokens <= 0:
        raise JmergeError(f"--max-new-tokens must be > 0, got {a.max_new_tokens}")
    if a.batch_size <= 0:
        raise JmergeError(f"--batch-size must be > 0, got {a.batch_size}")
    if a.limit is not None and a.limit <= 0:
        raise JmergeError(f"--limit must be > 0, got {a.limit}")
    if a.chat_template and a.no_chat_template:
        raise JmergeError("--chat-template and --no-chat-template exclude each other")
    if dryrun.wanted(a):
        return dryrun.run("generate", a, argv)
    from jmerge.generate import Sampling
    from jmerge.responses import write_responses
    sampling = Sampling(a.temperature, a.top_k, a.top_p, a.seed)
    results = write_responses(a.model, a.prompts, a.out, sampling=sampling, field=a.field, limit=a.limit,
                              max_new_tokens=a.max_new_tokens, batch_size=a.batch_size, mesh=a.mesh,
                              dtype=a.dtype, stop=a.stop, system=a.system, chat_template_file=a.chat_template,
                              chat_template=not a.no_chat_template, force=a.force)
    if a.out:
        n = sum(len(c.tokens) for c in results)
        print(f"{len(results)} responses, {n} tokens -> {a.out}", file=sys.stderr)
    return 0
