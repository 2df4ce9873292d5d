"""The search config (YAML): models, typed data, which searches to run, baselines, evaluation.

Every key is checked before any model or data file is opened: unknown keys are errors with a
did-you-mean, numbers are checked for kind and range (finite, whole, positive where they must
be), names must name an expert or a data type, and every problem of the file is reported at once.
Paths expand `~` and environment variables (e.g. `${JMERGE_CACHE}`). The result is typed
(`jmerge.search.settings`).
"""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Any

from jmerge.errors import JmergeError, collect
from jmerge.search.checks import NAT, NONNEG, POS, POS_INT, REAL, UNIT, Check, Num, show
from jmerge.search.parametrisations import TRANSFORMS
from jmerge.search.settings import (BASELINES, ROLE_BASELINES, SEARCHES, CoefficientSearch, DataSpec, EvalSettings,
                                    EvolveSearch, MaskSearch, Search, SearchConfig, SweepSearch, preference_types)

# Per section: a Num for numeric keys, a tuple of choices for enumerated ones. Bool keys are
# checked from their defaults; names, paths and lists are checked where they are used.
EXPORTS = ("soft", "threshold", "sample")
SUITES = ("safety", "overrefusal", "domain")
DTYPES = ("float32", "bfloat16", "float16")
RULES = {
    "top": dict(max_len=POS_INT, seed=NAT, checkpoint_every=POS_INT, dtype=DTYPES),
    "eval": dict(limit=POS_INT, max_new_tokens=POS_INT, batch_size=POS_INT),
    "coefficients": dict(granularity=("layer", "layer_module"), transform=TRANSFORMS,
                         init=REAL, steps=POS_INT, lr=POS, batch_size=POS_INT, warmup=NAT, beta=POS),
    "masks": dict(granularity=("element", "row"), steps=POS_INT, lr=POS, batch_size=POS_INT, temperature=POS,
                  init=REAL, sparsity=NONNEG, lam=REAL, export=EXPORTS, warmup=NAT, objective=("ce", "dpo"),
                  beta=POS),
    "evolve": dict(generations=POS_INT, popsize=Num("a whole number >= 2", whole=True, low=2), sigma0=POS,
                   batches=POS_INT, batch_size=POS_INT),
    "cocktail": dict(temperature=POS, batches=POS_INT, batch_size=POS_INT),
    "sweep": {},
}
DATA_KEYS = ("path", "weight", "source", "tokens")


def _top_defaults() -> dict:
    """SearchConfig's YAML keys with their defaults (None for the required ones)."""
    out = {}
    for f in dataclasses.fields(SearchConfig):
        if f.name == "source":
            continue
        has_factory = f.default_factory is not dataclasses.MISSING
        out[f.name] = f.default_factory() if has_factory else None if f.default is dataclasses.MISSING else f.default
    return out


# ------------------------------------------------------------------------------------- parse

def parse(raw: Any, source: Path | None = None) -> SearchConfig:
    """The config checked whole: every problem of the file in one JmergeError, before any model
    or data file is opened."""
    where = str(source) if source else "config"
    if raw is None:
        raise JmergeError(f"{where}: the config is empty")
    if not isinstance(raw, dict):
        raise JmergeError(f"{where}: expected a mapping of settings, got {show(raw)}")
    ck = Check()
    cfg = ck.fill(raw, _top_defaults(), RULES["top"], "")
    for req in ("base", "experts", "data", "searches", "out"):
        if raw.get(req) in (None, {}, []):
            ck.problems.append(f"missing required key {req!r}")
    base = ck.path(cfg["base"], "base") if cfg["base"] is not None else None
    out = ck.path(cfg["out"], "out") if cfg["out"] is not None else None
    if cfg["mesh"] is not None and not isinstance(cfg["mesh"], str):
        ck.bad("mesh", f"expected axis sizes such as 'fsdp=4,tensor=2', got {show(cfg['mesh'])}")
    experts = _experts(ck, cfg["experts"])
    data = _data(ck, cfg["data"])
    searches = {}
    if cfg["searches"] is not None and ck.mapping(cfg["searches"], SEARCHES, "searches"):
        searches = {k: SEARCHES[k](**ck.fill(v, SEARCHES[k].defaults(), RULES[k], f"searches.{k}"))
                    for k, v in cfg["searches"].items() if k in SEARCHES}
    _check_searches(ck, searches, experts, data)
    baselines = cfg["baselines"]
    if not isinstance(baselines, list):
        ck.bad("baselines", f"expected a list of fixed merges ({', '.join(BASELINES)}), got {show(baselines)}")
        baselines = []
    for b in baselines:
        if b not in BASELINES:
            close = difflib.get_close_matches(str(b), BASELINES, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            ck.bad("baselines", f"unknown baseline {show(b)}{hint}; known: {', '.join(BASELINES)}")
        elif b in ROLE_BASELINES:
            roles = searches.get("sweep") or SweepSearch()
            for name in (roles.domain, roles.align):
                if name not in experts:
                    ck.bad("baselines", f"{b} merges the experts as (domain fine-tune, safety-aligned model), "
                                        f"named by searches.sweep's domain / align ({roles.domain!r}, "
                                        f"{roles.align!r}); there is no expert {name!r}")
    ev = _eval(ck, raw.get("eval"))
    collect(ck.problems, where)
    return SearchConfig(base=base, experts=experts, data=data, searches=searches, baselines=list(baselines),
                        eval=ev, out=out, max_len=cfg["max_len"], seed=cfg["seed"],
                        checkpoint_every=cfg["checkpoint_every"], dtype=cfg["dtype"], mesh=cfg["mesh"],
                        source=source)


def _experts(ck: Check, raw) -> dict[str, Path]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        ck.bad("experts", f"expected a mapping name -> model path, got {show(raw)}")
        return {}
    paths = {str(k): ck.path(v, f"experts.{k}") for k, v in raw.items()}
    return {k: p for k, p in paths.items() if p is not None}


def _data(ck: Check, raw) -> dict[str, DataSpec]:
    if raw is None or not ck.mapping(raw, None, "data"):
        return {}
    out = {}
    for name, spec in raw.items():
        at = f"data.{name}"
        spec = {"path": spec} if isinstance(spec, str) else spec
        if not ck.mapping(spec, DATA_KEYS, at):
            continue
        path = ck.path(spec.get("path"), f"{at}.path")
        w = ck.number(spec.get("weight", 1.0), NONNEG, f"{at}.weight")
        src, tokens = spec.get("source"), spec.get("tokens")
        if src is not None and (not isinstance(src, str) or not src):
            ck.bad(f"{at}.source", f"expected a glob on the rows' source field, got {show(src)}")
        if tokens is not None:
            tokens = ck.number(tokens, Num("a positive whole number of answer tokens", whole=True, low=1),
                               f"{at}.tokens")
        out[str(name)] = DataSpec(path, w, src, tokens)
    return out


def _check_searches(ck: Check, searches: dict[str, Search], experts: dict, data: dict) -> None:
    """What each search names (experts, data types, merge method) and how its values fit
    together; a value already found bad (None) is not checked again."""
    c: CoefficientSearch | None = searches.get("coefficients")
    m: MaskSearch | None = searches.get("masks")
    if c is not None:
        at = "searches.coefficients"
        if not isinstance(c.clamp, list) or len(c.clamp) != 2:
            ck.bad(f"{at}.clamp", f"expected [low, high], got {show(c.clamp)}")
        elif (bounds := ck.numbers(c.clamp, REAL, f"{at}.clamp")) is not None:
            lo, hi = bounds
            if not lo < hi:
                ck.bad(f"{at}.clamp", f"low must be below high, got [{lo!r}, {hi!r}]")
            elif c.transform == "clamp" and c.init is not None and not lo <= c.init <= hi:
                ck.bad(f"{at}.init", f"{c.init!r} lies outside clamp [{lo!r}, {hi!r}]")
    if m is not None:
        at = "searches.masks"
        if m.safe is not None:
            ck.one_of(m.safe, experts, "one of the experts", f"{at}.safe")
        if experts and len(experts) < 2:
            ck.bad(at, "needs at least one expert besides the safe model")
        if m.data is not None:
            ck.one_of(m.data, data, "a data type", f"{at}.data")
        if m.objective == "dpo" and m.data is None:
            ck.bad(f"{at}.data", "objective dpo needs the data type of its {prompt, chosen, rejected} rows")
        if m.objective == "dpo" and m.prefer is not None:
            ck.bad(f"{at}.prefer", "objective dpo is DPO on `data` alone; prefer adds a DPO term to the ce "
                   "objective")
    for name, s in (("coefficients", c), ("masks", m)):
        if s is None:
            continue
        at = f"searches.{name}"
        if s.prefer is not None:
            ck.one_of(s.prefer, data, "a data type", f"{at}.prefer")
        if s.reference != "base" and (not isinstance(s.reference, str) or s.reference not in experts):
            ck.bad(f"{at}.reference", f"{show(s.reference)} is neither 'base' nor one of the experts "
                   f"({', '.join(experts)})")
    if "evolve" in searches:
        _check_evolve(ck, searches["evolve"], len(experts))
    if "sweep" in searches:
        s = searches["sweep"]
        for grid, values in (("alpha", s.alpha), ("beta", s.beta)):
            ck.numbers(values, REAL, f"searches.sweep.{grid}")
        for role, name in (("domain", s.domain), ("align", s.align)):
            ck.one_of(name, experts, "one of the experts", f"searches.sweep.{role}")
    preference = preference_types(searches)
    if m is not None and m.objective == "ce" and isinstance(m.data, str) and m.data in preference:
        ck.bad("searches.masks.data", f"{m.data!r} holds preference rows, not CE pairs")
    # Preference rows carry no CE weight: the weights that must not all be 0 are the CE types',
    # and only when a search optimises CE.
    needs_ce = bool({"coefficients", "evolve", "cocktail"} & set(searches)) or (m is not None and m.objective == "ce")
    weights = [d.weight for n, d in data.items() if n not in preference]
    if needs_ce and data and None not in weights and sum(weights) == 0:
        ck.bad("data", "the weights sum to 0, so there is nothing to optimise")


def _check_evolve(ck: Check, s: EvolveSearch, n_experts: int) -> None:
    from jmerge.merge import registry
    at = "searches.evolve"
    try:
        method = registry.get(s.method) if isinstance(s.method, str) else None
    except JmergeError as e:
        ck.bad(f"{at}.method", str(e))
        return
    if method is None:
        ck.bad(f"{at}.method", f"expected the name of a merge method, got {show(s.method)}")
        return
    if n_experts and (n_experts < method.min_models or (method.max_models or n_experts) < n_experts):
        ck.bad(f"{at}.method", f"{method.name} merges {method.min_models} to {method.max_models or 'any'} models "
               f"into the base, not {n_experts}")
    searched = []
    for key, names, known in (("params", s.params, method.model_params),
                              ("global_params", s.global_params, method.global_params)):
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            ck.bad(f"{at}.{key}", f"expected a list of {method.name}'s parameter names, got {show(names)}")
            continue
        for n in names:
            if n not in known:
                ck.bad(f"{at}.{key}", f"{n!r} is not a {'per-model' if key == 'params' else 'global'} parameter "
                       f"of {method.name} ({', '.join(known) or 'none'})")
        missing = [n for n, default in known.items() if default is None and n not in names]
        if missing:
            ck.bad(f"{at}.{key}", f"{method.name} needs {', '.join(map(repr, missing))} searched (it has no default)")
        searched += names
    if not searched and isinstance(s.params, list) and isinstance(s.global_params, list):
        ck.bad(at, "params and global_params are both empty: nothing to search")
    if ck.mapping(s.init, None, f"{at}.init"):
        for n, v in s.init.items():
            if n not in searched:
                close = difflib.get_close_matches(str(n), searched, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                ck.bad(f"{at}.init", f"{n!r} is not a searched parameter{hint}")
            else:
                ck.number(v, UNIT, f"{at}.init.{n}")


def _eval(ck: Check, raw) -> EvalSettings:
    ev = ck.fill(raw if raw is not None else {}, EvalSettings.defaults(), RULES["eval"], "eval")
    suites = ev["suites"]
    if not isinstance(suites, list) or not suites:
        ck.bad("eval.suites", f"expected a non-empty list of {', '.join(SUITES)}, got {show(suites)}")
    else:
        for s in suites:
            ck.choice(s, SUITES, "eval.suites")
    if not isinstance(ev["harmful"], str) or not ev["harmful"]:
        ck.bad("eval.harmful", f"expected a built-in harmful source or a prompt file, got {show(ev['harmful'])}")
    for k in ("domain", "benign", "data"):
        if ev[k] is not None and not (k == "benign" and ev[k] == "builtin"):
            ev[k] = ck.path(ev[k], f"eval.{k}")
    given = isinstance(raw, dict) and raw.get("domain") is not None  # a bad path is reported already
    if isinstance(suites, list) and "domain" in suites and not given:
        ck.bad("eval.domain", "the domain suite needs a JSONL file of held-out items")
    return EvalSettings(**ev)


def load(path: str | Path) -> SearchConfig:
    from jmerge.io.files import read_yaml
    path = Path(path)
    return parse(read_yaml(path, "search config"), path)
