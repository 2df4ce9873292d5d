"""The search config (YAML): models, typed data, which searches to run, baselines, evaluation.

Every key is checked before any model or data file is opened: unknown keys are errors with a
did-you-mean, numbers are checked for kind and range (finite, whole, positive where they must
be), names must name an expert or a data type, and every problem of the file is reported at once.
Paths expand `~` and environment variables (e.g. `${JMERGE_CACHE}`).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from pathlib import Path
from typing import Any

from jmerge.errors import JmergeError, collect
from jmerge.search.params import TRANSFORMS

SEARCHES = {
    "coefficients": dict(granularity="layer", transform="clamp", init=0.5, steps=40, lr=0.05, batch_size=4,
                         clamp=[0.0, 1.0], warmup=0, prefer=None, beta=0.1, reference="base"),
    "masks": dict(safe=None, granularity="row", steps=40, lr=0.05, batch_size=4, temperature=0.5, init=0.0,
                  sparsity=0.0, shared=True, lam=1.0, export="soft", data=None, warmup=0, objective="ce",
                  beta=0.1, reference="base", prefer=None),
    "evolve": dict(method="ties", params=["weight", "density"], global_params=[], init={}, generations=6,
                   popsize=8, sigma0=1 / 6, batches=2, batch_size=4),
    "cocktail": dict(temperature=1.0, batches=2, batch_size=4),
    "sweep": dict(alpha=[0.25, 0.5, 0.75, 1.0], beta=[0.25, 0.5, 0.75, 1.0], domain="domain", align="safety"),
}
BASELINES = ("task_arithmetic", "ties", "mergealign")
TOP = dict(base=None, experts=None, data=None, searches=None, baselines=list(BASELINES), eval={}, out=None,
           max_len=192, seed=0, checkpoint_every=10, dtype="float32", mesh=None)
EVAL = dict(suites=["safety", "overrefusal", "domain"], limit=64, max_new_tokens=48, batch_size=16,
            harmful="harmbench", benign=None, domain=None, data=None)


@dataclasses.dataclass
class DataSpec:
    path: Path
    weight: float = 1.0
    # Glob on each row's "source" field (e.g. "benign:*"): one file split into types that are
    # weighted apart, such as refusals and the compliant answers that guard against over-refusal.
    source: str | None = None
    # Loss on the first N answer tokens only: where a chat model decides to refuse or to answer,
    # so that decision is weighted by itself instead of drowned in the answer's content tokens.
    tokens: int | None = None


@dataclasses.dataclass
class SearchConfig:
    base: Path
    experts: dict[str, Path]
    data: dict[str, DataSpec]
    searches: dict[str, dict]
    baselines: list[str]
    eval: dict
    out: Path
    max_len: int
    seed: int
    checkpoint_every: int
    dtype: str
    mesh: str | None
    source: Path | None = None
    raw: dict = dataclasses.field(default_factory=dict)

    @property
    def preference_data(self) -> set[str]:
        """Data types of {prompt, chosen, rejected} rows: the one a dpo masks search reads and any
        search's `prefer` type (a DPO term added to its CE objective)."""
        return preference_types(self.searches)


def preference_types(searches: dict) -> set[str]:
    # Only names are collected: parse calls this before it has refused values of other kinds.
    out = {s["prefer"] for s in searches.values() if isinstance(s.get("prefer"), str)}
    m = searches.get("masks")
    return out | ({m["data"]} if m and m["objective"] == "dpo" and isinstance(m["data"], str) else set())


def _path(v, where: str) -> Path:
    """`~`, environment variables and `{cache}` (the jmerge cache root) expanded."""
    if not isinstance(v, str) or not v:
        raise JmergeError(f"{where}: expected a path, got {_show(v)}")
    from jmerge.default_model import cache_root
    return Path(os.path.expandvars(os.path.expanduser(v.replace("{cache}", str(cache_root())))))


# ----------------------------------------------------------------------------- checking values

# Counts, sizes and seeds end up in int32 arrays and PRNG keys.
INT_MAX = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class Num:
    """A numeric setting: always finite; whole if `whole`; at least `low` (above it if
    `strict`); at most `high`."""
    desc: str
    whole: bool = False
    low: float | None = None
    strict: bool = False
    high: float | None = None

    def problem(self, v) -> str | None:
        if isinstance(v, str):
            return _string_number(v, self.desc)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return f"expected {self.desc}, got {_show(v)}"
        if isinstance(v, float) and not math.isfinite(v):
            return f"expected {self.desc}, got {_show(v)}"
        if self.whole and isinstance(v, float) and not v.is_integer():
            return f"expected {self.desc}, got {v!r}"
        too_low = self.low is not None and (v <= self.low if self.strict else v < self.low)
        if too_low or (self.high is not None and v > self.high):
            return f"expected {self.desc}, got {v!r}"
        if self.whole and v > INT_MAX:
            return f"expected {self.desc} no larger than {INT_MAX}, got {v!r}"
        return None

    def value(self, v):
        return int(v) if self.whole else float(v)


POS_INT = Num("a positive whole number", whole=True, low=1)
NAT = Num("a whole number >= 0", whole=True, low=0)
POS = Num("a number > 0", low=0, strict=True)
NONNEG = Num("a number >= 0", low=0)
REAL = Num("a finite number")
UNIT = Num("a number in [0, 1]", low=0, high=1)  # CMA-ES searches inside [0, 1]

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

def _string_number(v: str, desc: str) -> str:
    from jmerge.io.files import yaml_float
    fix = yaml_float(v)
    if fix is not None and "e" in v.lower() and fix != v.strip():
        return f"{v!r} is a string: YAML 1.1 reads {v} as text; write {fix}"
    if fix is not None:
        return f"{v!r} is a string, expected {desc}; write the number without quotes"
    return f"expected {desc}, got the string {v!r}"


def _show(v) -> str:
    """A value as it reads in YAML (true, null, .nan), or its kind for a list or mapping."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null (an empty value)"
    if isinstance(v, float) and not math.isfinite(v):
        return ".nan" if v != v else ("-.inf" if v < 0 else ".inf")
    if isinstance(v, dict):
        return "a mapping"
    if isinstance(v, list):
        return "a list"
    return repr(v)


class _Check:
    """The problems of one config file, gathered so that all of them are reported at once."""

    def __init__(self):
        self.problems: list[str] = []

    def bad(self, at: str, msg: str) -> None:
        self.problems.append(f"{at}: {msg}" if at else msg)

    def mapping(self, d, allowed, at: str) -> bool:
        """Whether d is a mapping; each key outside `allowed` is a problem with a did-you-mean."""
        if not isinstance(d, dict):
            self.bad(at, f"expected a mapping, got {_show(d)}")
            return False
        for k in d:
            if allowed is not None and k not in allowed:
                close = difflib.get_close_matches(str(k), list(allowed), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                self.bad(at, f"unknown key {k!r}{hint}; allowed: {', '.join(allowed)}")
        return True

    def number(self, v, rule: Num, at: str):
        """v as an int or float, or None after recording why it is not one of `rule`."""
        problem = rule.problem(v)
        if problem:
            self.bad(at, problem)
            return None
        return rule.value(v)

    def choice(self, v, options: tuple, at: str):
        if isinstance(v, str) and v in options:
            return v
        close = difflib.get_close_matches(str(v), options, n=1) if isinstance(v, str) else []
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        self.bad(at, f"expected {' or '.join(options)}, got {_show(v)}{hint}")
        return None

    def path(self, v, at: str) -> Path | None:
        try:
            return _path(v, at)
        except JmergeError as e:
            self.problems.append(str(e))
            return None

    def one_of(self, v, names, what: str, at: str) -> bool:
        """Whether v names one of `names` (experts, data types)."""
        if isinstance(v, str) and v in names:
            return True
        self.bad(at, f"{_show(v)} is not {what} ({', '.join(map(str, names)) or 'none given'})")
        return False

    def numbers(self, v, rule: Num, at: str) -> list | None:
        """A non-empty list of numbers of `rule` (a grid)."""
        if not isinstance(v, list) or not v:
            self.bad(at, f"expected a non-empty list of numbers, got {_show(v)}")
            return None
        out = [self.number(x, rule, f"{at}[{i}]") for i, x in enumerate(v)]
        return None if None in out else out

    def fill(self, d, defaults: dict, rules: dict, at: str) -> dict:
        """The defaults overridden by d's values, each checked by its rule (None where bad)."""
        out = dict(defaults)
        if d is None or not self.mapping(d, defaults, at):
            return out
        for k, v in d.items():
            if k not in defaults:
                continue
            key_at, rule = f"{at}.{k}" if at else str(k), rules.get(k)
            if isinstance(rule, Num):
                v = self.number(v, rule, key_at)
            elif isinstance(rule, tuple):
                v = self.choice(v, rule, key_at)
            elif isinstance(defaults[k], bool) and not isinstance(v, bool):
                self.bad(key_at, f"expected true or false, got {_show(v)}")
                v = None
            out[k] = v
        return out


# ------------------------------------------------------------------------------------- parse

def parse(raw: Any, source: Path | None = None) -> SearchConfig:
    """The config checked whole: every problem of the file in one JmergeError, before any model
    or data file is opened."""
    where = str(source) if source else "config"
    if raw is None:
        raise JmergeError(f"{where}: the config is empty")
    if not isinstance(raw, dict):
        raise JmergeError(f"{where}: expected a mapping of settings, got {_show(raw)}")
    ck = _Check()
    cfg = ck.fill(raw, TOP, RULES["top"], "")
    for req in ("base", "experts", "data", "searches", "out"):
        if raw.get(req) in (None, {}, []):
            ck.problems.append(f"missing required key {req!r}")
    base = ck.path(cfg["base"], "base") if cfg["base"] is not None else None
    out = ck.path(cfg["out"], "out") if cfg["out"] is not None else None
    if cfg["mesh"] is not None and not isinstance(cfg["mesh"], str):
        ck.bad("mesh", f"expected axis sizes such as 'fsdp=4,tensor=2', got {_show(cfg['mesh'])}")
    experts = _experts(ck, cfg["experts"])
    data = _data(ck, cfg["data"])
    searches = {}
    if cfg["searches"] is not None and ck.mapping(cfg["searches"], SEARCHES, "searches"):
        searches = {k: ck.fill(v, SEARCHES[k], RULES[k], f"searches.{k}")
                    for k, v in cfg["searches"].items() if k in SEARCHES}
    _check_searches(ck, searches, experts, data)
    baselines = cfg["baselines"]
    if not isinstance(baselines, list):
        ck.bad("baselines", f"expected a list of fixed merges ({', '.join(BASELINES)}), got {_show(baselines)}")
        baselines = []
    for b in baselines:
        if b not in BASELINES:
            close = difflib.get_close_matches(str(b), BASELINES, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            ck.bad("baselines", f"unknown baseline {_show(b)}{hint}; known: {', '.join(BASELINES)}")
    ev = _eval(ck, cfg["eval"])
    collect(ck.problems, where)
    return SearchConfig(base=base, experts=experts, data=data, searches=searches, baselines=list(baselines),
                        eval=ev, out=out, max_len=cfg["max_len"], seed=cfg["seed"],
                        checkpoint_every=cfg["checkpoint_every"], dtype=cfg["dtype"], mesh=cfg["mesh"],
                        source=source, raw=raw)


def _experts(ck: _Check, raw) -> dict[str, Path]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        ck.bad("experts", f"expected a mapping name -> model path, got {_show(raw)}")
        return {}
    paths = {str(k): ck.path(v, f"experts.{k}") for k, v in raw.items()}
    return {k: p for k, p in paths.items() if p is not None}


def _data(ck: _Check, raw) -> dict[str, DataSpec]:
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
            ck.bad(f"{at}.source", f"expected a glob on the rows' source field, got {_show(src)}")
        if tokens is not None:
            tokens = ck.number(tokens, Num("a positive whole number of answer tokens", whole=True, low=1),
                               f"{at}.tokens")
        out[str(name)] = DataSpec(path, w, src, tokens)
    return out


def _check_searches(ck: _Check, searches: dict, experts: dict, data: dict) -> None:
    """What each search names (experts, data types, merge method) and how its values fit
    together; a value already found bad (None) is not checked again."""
    if "coefficients" in searches:
        c, at = searches["coefficients"], "searches.coefficients"
        clamp = c["clamp"]
        if not isinstance(clamp, list) or len(clamp) != 2:
            ck.bad(f"{at}.clamp", f"expected [low, high], got {_show(clamp)}")
        elif (bounds := ck.numbers(clamp, REAL, f"{at}.clamp")) is not None:
            lo, hi = bounds
            if not lo < hi:
                ck.bad(f"{at}.clamp", f"low must be below high, got [{lo!r}, {hi!r}]")
            elif c["transform"] == "clamp" and c["init"] is not None and not lo <= c["init"] <= hi:
                ck.bad(f"{at}.init", f"{c['init']!r} lies outside clamp [{lo!r}, {hi!r}]")
    if "masks" in searches:
        m, at = searches["masks"], "searches.masks"
        if m["safe"] is not None:
            ck.one_of(m["safe"], experts, "one of the experts", f"{at}.safe")
        if experts and len(experts) < 2:
            ck.bad(at, "needs at least one expert besides the safe model")
        if m["data"] is not None:
            ck.one_of(m["data"], data, "a data type", f"{at}.data")
        if m["objective"] == "dpo" and m["data"] is None:
            ck.bad(f"{at}.data", "objective dpo needs the data type of its {prompt, chosen, rejected} rows")
        if m["objective"] == "dpo" and m["prefer"] is not None:
            ck.bad(f"{at}.prefer", "objective dpo is DPO on `data` alone; prefer adds a DPO term to the ce "
                   "objective")
    for name in ("coefficients", "masks"):
        s, at = searches.get(name), f"searches.{name}"
        if s is None:
            continue
        if s["prefer"] is not None:
            ck.one_of(s["prefer"], data, "a data type", f"{at}.prefer")
        if s["reference"] != "base" and (not isinstance(s["reference"], str) or s["reference"] not in experts):
            ck.bad(f"{at}.reference", f"{_show(s['reference'])} is neither 'base' nor one of the experts "
                   f"({', '.join(experts)})")
    if "evolve" in searches:
        _check_evolve(ck, searches["evolve"], len(experts))
    if "sweep" in searches:
        s = searches["sweep"]
        for grid in ("alpha", "beta"):
            ck.numbers(s[grid], REAL, f"searches.sweep.{grid}")
        for role in ("domain", "align"):
            ck.one_of(s[role], experts, "one of the experts", f"searches.sweep.{role}")
    preference = preference_types(searches)
    for name, s in searches.items():
        if s.get("objective", "ce") == "ce" and isinstance(s.get("data"), str) and s["data"] in preference:
            ck.bad(f"searches.{name}.data", f"{s['data']!r} holds preference rows, not CE pairs")
    # Preference rows carry no CE weight: the weights that must not all be 0 are the CE types',
    # and only when a search optimises CE.
    needs_ce = bool({"coefficients", "evolve", "cocktail"} & set(searches)) or \
        searches.get("masks", {}).get("objective") == "ce"
    weights = [d.weight for n, d in data.items() if n not in preference]
    if needs_ce and data and None not in weights and sum(weights) == 0:
        ck.bad("data", "the weights sum to 0, so there is nothing to optimise")


def _check_evolve(ck: _Check, s: dict, n_experts: int) -> None:
    from jmerge.merge import registry
    at = "searches.evolve"
    try:
        method = registry.get(s["method"]) if isinstance(s["method"], str) else None
    except JmergeError as e:
        ck.bad(f"{at}.method", str(e))
        return
    if method is None:
        ck.bad(f"{at}.method", f"expected the name of a merge method, got {_show(s['method'])}")
        return
    if n_experts and (n_experts < method.min_models or (method.max_models or n_experts) < n_experts):
        ck.bad(f"{at}.method", f"{method.name} merges {method.min_models} to {method.max_models or 'any'} models "
               f"into the base, not {n_experts}")
    searched = []
    for key, known in (("params", method.model_params), ("global_params", method.global_params)):
        names = s[key]
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            ck.bad(f"{at}.{key}", f"expected a list of {method.name}'s parameter names, got {_show(names)}")
            continue
        for n in names:
            if n not in known:
                ck.bad(f"{at}.{key}", f"{n!r} is not a {'per-model' if key == 'params' else 'global'} parameter "
                       f"of {method.name} ({', '.join(known) or 'none'})")
        missing = [n for n, default in known.items() if default is None and n not in names]
        if missing:
            ck.bad(f"{at}.{key}", f"{method.name} needs {', '.join(map(repr, missing))} searched (it has no default)")
        searched += names
    if not searched and isinstance(s["params"], list) and isinstance(s["global_params"], list):
        ck.bad(at, "params and global_params are both empty: nothing to search")
    init = s["init"]
    if ck.mapping(init, None, f"{at}.init"):
        for n, v in init.items():
            if n not in searched:
                close = difflib.get_close_matches(str(n), searched, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                ck.bad(f"{at}.init", f"{n!r} is not a searched parameter{hint}")
            else:
                ck.number(v, UNIT, f"{at}.init.{n}")


def _eval(ck: _Check, raw) -> dict:
    ev = ck.fill(raw if raw is not None else {}, EVAL, RULES["eval"], "eval")
    suites = ev["suites"]
    if not isinstance(suites, list) or not suites:
        ck.bad("eval.suites", f"expected a non-empty list of {', '.join(SUITES)}, got {_show(suites)}")
    else:
        for s in suites:
            ck.choice(s, SUITES, "eval.suites")
    if not isinstance(ev["harmful"], str) or not ev["harmful"]:
        ck.bad("eval.harmful", f"expected a built-in harmful source or a prompt file, got {_show(ev['harmful'])}")
    for k in ("domain", "benign", "data"):
        if ev[k] is not None and not (k == "benign" and ev[k] == "builtin"):
            ev[k] = ck.path(ev[k], f"eval.{k}")
    given = isinstance(raw, dict) and raw.get("domain") is not None  # a bad path is reported already
    if isinstance(suites, list) and "domain" in suites and not given:
        ck.bad("eval.domain", "the domain suite needs a JSONL file of held-out items")
    return ev


def load(path: str | Path) -> SearchConfig:
    from jmerge.io.files import read_yaml
    path = Path(path)
    return parse(read_yaml(path, "search config"), path)
