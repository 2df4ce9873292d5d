"""`jmerge eval`: safety, over-refusal and domain suites over one or more models -> a report.

Everything that can be checked before weights are read is checked first (suites, numbers,
prompt and domain files, tokenizers and chat templates, the output directory), so bad input
costs seconds and ends in one line with exit code 2. Models of the same shape share one runtime:
the second model's weights swap into the compiled programs of the first.

Data: harmful prompts default to HarmBench's hash *test* split (built-in sources are split;
prompt files are used whole); XSTest and PubMedQA come from --data or $JMERGE_DATA.
"""

from __future__ import annotations

import datetime
import os
import sys
from pathlib import Path

from jmerge.errors import JmergeError



def _parser():
    from jmerge.cli import ArgumentParser
    p = ArgumentParser(prog="jmerge eval", description="Evaluate models: safety, over-refusal, domain.")
    p.add_argument("--models", nargs="+", required=True, help="model directories / .gguf files / BASE+ADAPTER")
    p.add_argument("--suite", default="safety,overrefusal,domain",
                   help="comma-separated: safety, overrefusal, domain (default: all three)")
    p.add_argument("--judge", metavar="MODEL", help="judge model (Llama-Guard style) for the unsafe rate")
    p.add_argument("--judge-template", default="llamaguard",
                   help="'llamaguard' (default), 'chat' (the judge tokenizer's template), or a FILE "
                        "with {prompt} and {response}")
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
    return p


def _positive(name: str, value) -> None:
    if value is not None and value <= 0:
        raise JmergeError(f"--{name} must be > 0, got {value}")


def _model_names(models: list[str]) -> list[str]:
    """Short unique names for the report: the last path component, numbered when repeated."""
    base = [Path(m.rstrip("/")).name or m for m in models]
    seen: dict[str, int] = {}
    names = []
    for b in base:
        seen[b] = seen.get(b, 0) + 1
        names.append(b if base.count(b) == 1 else f"{b}#{seen[b]}")
    return names


def _inputs(a) -> list:
    """Every path the evaluation reads but the data directory: the report must not be, hold or
    lie inside any of them."""
    from jmerge.io.atomic import model_inputs
    models = [p for m in a.models for p in model_inputs(m)] + model_inputs(a.judge)
    return models + [a.judge_template, a.safety_prompts, *(a.domain or []), a.chat_template]


def _data_dirs(a) -> list:
    return [a.data or os.environ.get("JMERGE_DATA")]


def _tokenizer_for(model: str, chat_template_file, need_chat: bool):
    """The model's tokenizer, read before any weight so a missing or broken one is found up front
    (None for GGUF: its tokenizer lives in the metadata read with the weights)."""
    from jmerge.generate import load_tokenizer, require_chat_template, tokenizer_home
    from jmerge.io import split_adapter
    base = split_adapter(model)[0]
    if not Path(base).exists():
        raise JmergeError(f"{base}: no such file or directory")
    home = tokenizer_home(model)
    tok = None if home.suffix == ".gguf" else load_tokenizer(home, None, chat_template_file)
    if tok is not None and need_chat:
        require_chat_template(tok)
    return tok


def main(argv=None) -> int:
    from jmerge.cli import quiet_jax
    quiet_jax()
    a = _parser().parse_args(argv)

    from jmerge.eval import suites as S
    from jmerge.eval.prompts import load_xstest
    from jmerge.io.atomic import check_target

    suites = S.parse_suites(a.suite)
    for name in ("max-new-tokens", "batch-size", "limit", "context-tokens", "bootstrap"):
        _positive(name, getattr(a, name.replace("-", "_")))
    if a.chat_template and a.no_chat_template:
        raise JmergeError("--chat-template and --no-chat-template exclude each other")
    if a.domain and "domain" not in suites:
        raise JmergeError("--domain given but the domain suite is not selected (add it to --suite)")
    if a.judge and "safety" not in suites:
        raise JmergeError("--judge given but the safety suite is not selected (add it to --suite)")
    out = check_target(a.out, a.force, inputs=_inputs(a), data_dirs=_data_dirs(a))
    data = a.data or os.environ.get("JMERGE_DATA")
    if a.data and not Path(a.data).is_dir():
        raise JmergeError(f"--data {a.data}: not a directory")
    limit = a.limit

    # Data first: a missing file should not wait for a model to load.
    sets = {}
    if "safety" in suites:
        sets["safety"] = S.harmful_prompts(a.safety_prompts, data, limit, a.field, a.category_field)
    elif a.field or a.category_field:
        raise JmergeError("--field/--category-field apply to --safety-prompts; the safety suite is not selected")
    if "overrefusal" in suites:
        sets["overrefusal"] = S.safe_prompts(load_xstest(data))[:limit]
    if "domain" in suites:
        tasks = [S.load_domain(d, data) for d in (a.domain or ["pubmedqa"])]
        sets["domain"] = [S.DomainTask(t.name, t.kind, t.items[:limit]) for t in tasks]
    generating = "safety" in suites or "overrefusal" in suites or any(
        t.kind == "numeric" for t in sets.get("domain", []))
    need_chat = generating and not a.no_chat_template

    # Tokenizers (and chat templates) of every model before any weights.
    toks = [_tokenizer_for(m, a.chat_template, need_chat) for m in a.models]

    import jax
    from tqdm.auto import tqdm

    from jmerge import sharding as shd
    from jmerge.eval.model_judge import ModelJudge, check_tokenizer_fits
    from jmerge.generate import default_eos_ids, load_tokenizer, require_chat_template
    from jmerge.io import load_model, split_adapter
    mesh = shd.make_mesh(a.mesh)

    judge = None
    if a.judge:
        judge = ModelJudge(a.judge, a.judge_template, fallback_tokenizer=next((t for t in toks if t), None),
                           mesh=mesh, dtype=a.dtype, batch_size=a.batch_size, progress=True)

    report = {"created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "settings": dict(suites=",".join(suites), safety_prompts=a.safety_prompts,
                               judge=a.judge, judge_template=a.judge_template if a.judge else None,
                               limit=limit, max_new_tokens=a.max_new_tokens, batch_size=a.batch_size,
                               context_tokens=a.context_tokens, dtype=a.dtype, mesh=a.mesh,
                               chat_template=not a.no_chat_template, system=a.system,
                               bootstrap=a.bootstrap, seed=a.seed,
                               domain=[t.name for t in sets.get("domain", [])] or None),
              "models": []}
    runtimes: dict = {}
    names = _model_names(a.models)
    boot = dict(n_boot=a.bootstrap, seed=a.seed)
    for name, model, tok in tqdm(list(zip(names, a.models, toks)), desc="models", unit="model",
                                 disable=len(a.models) < 2):
        loaded = load_model(model, mesh=mesh, dtype=a.dtype, progress=True)
        if tok is None:
            tok = load_tokenizer(split_adapter(model)[0], loaded.write_tokenizer, a.chat_template)
            if need_chat:
                require_chat_template(tok)
        check_tokenizer_fits(tok, loaded.cfg, model)
        eos = default_eos_ids(loaded.cfg, tok, split_adapter(model)[0])
        shape_key = (loaded.cfg, tuple((tuple(x.shape), str(x.dtype)) for x in jax.tree.leaves(loaded.params)))
        rt = runtimes.get(shape_key)
        if rt is None:
            runtimes.clear()  # one model's runtime in memory at a time
            rt = runtimes[shape_key] = S.Runtime(
                loaded.cfg, loaded.params, tok, mesh=mesh, max_new_tokens=a.max_new_tokens,
                batch_size=a.batch_size, eos_ids=eos, chat_template=not a.no_chat_template,
                system=a.system, progress=True)
        else:
            rt.set_tokenizer(tok, eos)
        params = loaded.params
        del loaded
        entry = {"name": name, "path": str(model), "suites": {}}
        for suite in suites:
            tqdm.write(f"[{name}] {suite}", file=sys.stderr)
            if suite == "safety":
                entry["suites"]["safety"] = S.safety(params, rt, sets["safety"], judge=judge, **boot)
            elif suite == "overrefusal":
                entry["suites"]["overrefusal"] = S.overrefusal(params, rt, sets["overrefusal"], **boot)
            else:
                entry["suites"]["domain"] = S.domain(params, rt, sets["domain"],
                                                     context_tokens=a.context_tokens, **boot)
        report["models"].append(entry)
        _print_summary(entry)

    from jmerge.eval.report import write_report
    from jmerge.io.atomic import atomic_dir
    with atomic_dir(out, a.force, inputs=_inputs(a), data_dirs=_data_dirs(a)) as tmp:
        files = write_report(report, tmp)
    print(f"report -> {out}/ ({', '.join(f.name for f in files.values())})", file=sys.stderr)
    return 0


def _print_summary(entry: dict) -> None:
    from jmerge.eval.report import headline
    parts = []
    for col, v in headline(entry).items():
        parts.append(f"{col} {v['mean']:.3f} [{v['lo']:.3f}, {v['hi']:.3f}]" if isinstance(v, dict)
                     else f"{col} {v:.3f}")
    print(f"{entry['name']}: " + "; ".join(parts), file=sys.stderr)


if __name__ == "__main__":
    from jmerge.cli import leave, run
    leave(run(main))
