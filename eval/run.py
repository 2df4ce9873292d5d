"""`jmerge eval`'s work: safety, over-refusal and domain suites over one or more models -> a report.

Everything that can be checked before weights are read is checked first (prompt and domain
files, tokenizers and chat templates, the output directory), so bad input costs seconds and ends
in one line with exit code 2. Models of the same shape share one runtime: the second model's
weights swap into the compiled programs of the first.

Data: harmful prompts default to HarmBench's hash *test* split (built-in sources are split;
prompt files are used whole); XSTest and PubMedQA come from `data` or $JMERGE_DATA.
"""

from __future__ import annotations

import dataclasses
import datetime
import sys
from pathlib import Path

from jmerge import distributed
from jmerge.errors import JmergeError
from jmerge.eval import suites as S
from jmerge.eval.domain import DEFAULT_CONTEXT_TOKENS, DomainTask, load_domain
from jmerge.eval.prompts import data_dir
from jmerge.eval.runtime import Runtime


@dataclasses.dataclass(frozen=True)
class EvalOptions:
    """One evaluation; the fields are `jmerge eval`'s flags (and their defaults)."""
    models: list[str]
    suites: list[str]  # as S.parse_suites gives them: the report's order
    out: str = "eval-report"
    force: bool = False
    judge: str | None = None  # a judge model (Llama-Guard style) for the unsafe rate
    judge_template: str = "llamaguard"
    refusal_judge: str = "keyword"  # jmerge.eval.judges.REFUSAL_JUDGES
    safety_prompts: str = "harmbench"
    field: str | None = None
    category_field: str | None = None
    data: str | None = None  # directory with xstest/ and pubmedqa/ (default: $JMERGE_DATA)
    domain: list[str] | None = None  # domain task files (default: pubmedqa)
    context_tokens: int = DEFAULT_CONTEXT_TOKENS
    limit: int | None = None
    mesh: str | None = None
    dtype: str | None = None
    max_new_tokens: int = 256
    batch_size: int = 16
    chat_template: str | None = None  # a Jinja file for the evaluated models
    no_chat_template: bool = False
    system: str | None = None
    bootstrap: int = 1000
    seed: int = 0


def _model_names(models: list[str]) -> list[str]:
    """Short unique names for the report: the last path component, numbered when repeated."""
    base = [Path(m.rstrip("/")).name or m for m in models]
    seen: dict[str, int] = {}
    names = []
    for b in base:
        seen[b] = seen.get(b, 0) + 1
        names.append(b if base.count(b) == 1 else f"{b}#{seen[b]}")
    return names


def _inputs(o: EvalOptions) -> list:
    """Every path the evaluation reads but the data directory: the report must not be, hold or
    lie inside any of them."""
    from jmerge.io.atomic import model_inputs
    models = [p for m in o.models for p in model_inputs(m)] + model_inputs(o.judge)
    return models + _data_files(o)


def _data_files(o: EvalOptions) -> list:
    """The files the evaluation reads besides the models (and the data directory)."""
    return [o.judge_template, o.safety_prompts, *(o.domain or []), o.chat_template]


def _data_dirs(o: EvalOptions) -> list:
    return [data_dir(o.data)]


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


def eval_sets(o: EvalOptions, data) -> dict:
    """{suite: prompts or domain tasks} for the suites of `o`, each cut to `o.limit`."""
    from jmerge.eval.prompts import load_xstest
    sets = {}
    if "safety" in o.suites:
        sets["safety"] = S.harmful_prompts(o.safety_prompts, data, o.limit, o.field, o.category_field)
    elif o.field or o.category_field:
        raise JmergeError("--field/--category-field apply to --safety-prompts; the safety suite is not selected")
    if "overrefusal" in o.suites:
        sets["overrefusal"] = S.safe_prompts(load_xstest(data))[:o.limit]
    if "jailbreak" in o.suites:
        sets["jailbreak"] = S.jailbreak_prompts(o.limit)
    if "domain" in o.suites:
        tasks = [load_domain(d, data) for d in (o.domain or ["pubmedqa"])]
        sets["domain"] = [DomainTask(t.name, t.kind, t.items[:o.limit]) for t in tasks]
    return sets


def _settings(o: EvalOptions, sets: dict) -> dict:
    return dict(suites=",".join(o.suites), safety_prompts=o.safety_prompts,
                judge=o.judge, judge_template=o.judge_template if o.judge else None,
                refusal_judge=o.refusal_judge,
                limit=o.limit, max_new_tokens=o.max_new_tokens, batch_size=o.batch_size,
                context_tokens=o.context_tokens, dtype=o.dtype, mesh=o.mesh,
                chat_template=not o.no_chat_template, system=o.system,
                bootstrap=o.bootstrap, seed=o.seed,
                domain=[t.name for t in sets.get("domain", [])] or None)


def evaluate_models(o: EvalOptions, on_model=None) -> tuple[Path, dict]:
    """Run the suites of `o` over its models and write the report (JSON, Markdown, PNG) to
    `o.out`; `on_model(entry)` gets each model's report entry as it is done. Returns the report
    directory and write_report's files."""
    from jmerge.io.atomic import check_target
    out = check_target(o.out, o.force, inputs=_inputs(o), data_dirs=_data_dirs(o))
    # every process must read the same data (not the models: hashing a 70B would take minutes)
    distributed.check_same_files(_data_files(o) + _data_dirs(o))
    data = data_dir(o.data)
    if o.data and not Path(o.data).is_dir():
        raise JmergeError(f"--data {o.data}: not a directory")

    # Data first: a missing file should not wait for a model to load.
    sets = eval_sets(o, data)
    generating = bool({"safety", "overrefusal", "jailbreak"} & set(o.suites)) or any(
        t.kind == "numeric" for t in sets.get("domain", []))
    need_chat = generating and not o.no_chat_template

    # Tokenizers (and chat templates) of every model before any weights.
    toks = [_tokenizer_for(m, o.chat_template, need_chat) for m in o.models]

    from tqdm.auto import tqdm

    from jmerge import sharding as shd
    from jmerge.eval.model_judge import ModelJudge
    mesh = shd.make_mesh(o.mesh)

    judge = None
    if o.judge:
        judge = ModelJudge(o.judge, o.judge_template, fallback_tokenizer=next((t for t in toks if t), None),
                           mesh=mesh, dtype=o.dtype, batch_size=o.batch_size, progress=True)

    from jmerge.eval.judges import refusal_judge
    refusal = refusal_judge(o.refusal_judge)  # before the models: a missing head fails fast

    report = {"created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "settings": _settings(o, sets), "models": []}
    runtimes: dict = {}
    for name, model, tok in tqdm(list(zip(_model_names(o.models), o.models, toks)), desc="models",
                                 unit="model", disable=len(o.models) < 2):
        params, rt = _runtime_for(model, tok, o, mesh, need_chat, runtimes)
        results = S.run_suites(params, rt, {s: sets[s] for s in o.suites}, judge=judge, refusal=refusal,
                               context_tokens=o.context_tokens, n_boot=o.bootstrap, seed=o.seed,
                               log=lambda suite: tqdm.write(f"[{name}] {suite}", file=sys.stderr))
        rt.release()  # the next model loads without this one beside it on the devices
        del params
        entry = {"name": name, "path": str(model), "suites": results}
        report["models"].append(entry)
        if on_model is not None:
            on_model(entry)

    from jmerge.eval.report import write_report
    from jmerge.io.atomic import atomic_dir
    with atomic_dir(out, o.force, inputs=_inputs(o), data_dirs=_data_dirs(o)) as tmp:
        # every process holds the same report; one writes it
        files = write_report(report, tmp) if distributed.is_lead() else {}
    return out, files


def _runtime_for(model: str, tok, o: EvalOptions, mesh, need_chat: bool, runtimes: dict):
    """The model's params, and a Runtime for them: the last model's when the shapes match (its
    compiled programs reused), else a new one."""
    import jax

    from jmerge.eval.model_judge import check_tokenizer_fits
    from jmerge.generate import default_eos_ids, load_tokenizer, require_chat_template
    from jmerge.io import load_model, split_adapter
    loaded = load_model(model, mesh=mesh, dtype=o.dtype, progress=True)
    if tok is None:
        tok = load_tokenizer(split_adapter(model)[0], loaded.write_tokenizer, o.chat_template)
        if need_chat:
            require_chat_template(tok)
    check_tokenizer_fits(tok, loaded.cfg, model)
    eos = default_eos_ids(loaded.cfg, tok, split_adapter(model)[0])
    shape_key = (loaded.cfg, tuple((tuple(x.shape), str(x.dtype)) for x in jax.tree.leaves(loaded.params)))
    rt = runtimes.get(shape_key)
    if rt is None:
        runtimes.clear()  # one model's runtime in memory at a time
        rt = runtimes[shape_key] = Runtime(
            loaded.cfg, loaded.params, tok, mesh=mesh, max_new_tokens=o.max_new_tokens,
            batch_size=o.batch_size, eos_ids=eos, chat_template=not o.no_chat_template,
            system=o.system, progress=True)
    else:
        rt.set_tokenizer(tok, eos)
    return loaded.params, rt
