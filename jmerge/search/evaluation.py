"""The search job's evaluation: the prompt sets and domain tasks of the config's eval section,
and every model through the suites with one compiled runtime."""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Callable, Iterable

from jmerge.errors import JmergeError
from jmerge.search.outputs import slug
from jmerge.search.settings import EvalSettings

if TYPE_CHECKING:
    from jmerge.search.run import SearchRun


def eval_sets(ev: EvalSettings) -> tuple[dict, str | None, list]:
    """(prompt sets by suite, where the over-refusal prompts came from, domain tasks) of the
    config's eval section, read and cut to its limit."""
    from jmerge.eval import prompts as P
    from jmerge.eval import suites as S
    from jmerge.eval.domain import load_domain
    limit = ev.limit
    sets = {}
    if "safety" in ev.suites:
        sets["safety"] = S.harmful_prompts(ev.harmful, ev.data, limit)
    over_source = None
    if "overrefusal" in ev.suites:
        # XSTest's safe prompts when the data is there (dev data, not shipped); else `benign`.
        data_dir = P.data_dir(ev.data)
        try:
            xs, over_source = P.load_xstest(data_dir), "xstest"
        except JmergeError:
            if ev.benign is None:
                raise
            xs, over_source = _benign(ev.benign), str(ev.benign)
        sets["overrefusal"] = S.safe_prompts(xs)[:limit]
    if "jailbreak" in ev.suites:
        sets["jailbreak"] = S.jailbreak_prompts(limit)
    tasks = []
    if "domain" in ev.suites:
        if ev.domain is None:
            raise JmergeError("eval.domain: the domain suite needs a JSONL file of held-out items")
        task = load_domain(ev.domain, ev.data)
        tasks = [dataclasses.replace(task, items=task.items[:limit])]
    return sets, over_source, tasks


def evaluate(job: SearchRun, models: Iterable[tuple[str, dict, dict]], prepared: tuple,
             keep: Callable[[str, dict, dict], None] | None = None) -> dict:
    """Every model through the eval suites with one Runtime: compiled once, params swapped.
    `models`: (name, params, info), each brought to the devices (from host memory where parked)
    and let go after its suites, before the next one is made: merges that a generator makes on
    demand are on the devices one at a time. `keep(name, params, info)` is given each searched
    merge after its suites (to save it). `prepared`: what `eval_sets` returned for the job's
    config."""
    from jmerge.eval import suites as S
    from jmerge.eval.runtime import Runtime
    ev = job.c.eval
    sets, over_source, tasks = prepared
    import jax

    from jmerge.search.export import on_device
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), job.base)
    rt = Runtime(job.model_cfg, shapes, job.tokenizer, mesh=job.mesh, max_new_tokens=ev.max_new_tokens,
                 batch_size=ev.batch_size, progress=False)
    from tqdm.auto import tqdm
    entries = []
    for name, params, info in tqdm(models, desc="evaluate", unit="model", disable=not job.progress):
        params = on_device(params)
        suites = S.run_suites(params, rt, {**sets, "domain": tasks} if tasks else sets)
        if keep is not None and name.startswith("searched:"):
            keep(name, params, info)
        rt.release()
        del params  # before the next one is made
        entries.append(dict(name=name, path=str(job.out / "models" / slug(name)) if name.startswith("searched:") else "",
                            info=info, suites=suites))
    settings = dict(config=str(job.c.source), eval={k: str(v) for k, v in ev.to_json().items()},
                    overrefusal_set=over_source, searches={k: s.to_json() for k, s in job.c.searches.items()},
                    data={k: [str(v.path), v.weight, v.source] for k, v in job.c.data.items()})
    return dict(created=time.strftime("%Y-%m-%dT%H:%M:%S"), settings=settings, models=entries)


def _benign(spec) -> list:
    """`builtin`: the held-out part of the code-generated benign set (jmerge.synth), which the
    testbed trains on only through its train split; otherwise a prompt file."""
    from jmerge.eval import prompts as P
    if spec != "builtin":
        return P.load_prompts(str(spec))
    from jmerge.synth import benign_prompts
    texts = [t for t in benign_prompts() if P.in_test_split(t, 0.2)]
    return [P.Prompt(text=t, source="benign", id=f"benign:{i}") for i, t in enumerate(texts)]
