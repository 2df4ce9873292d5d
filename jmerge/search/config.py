"""The search config (YAML): models, typed data, which searches to run, baselines, evaluation.

Every key is checked: unknown keys are errors with a did-you-mean, values are typed, and paths
expand `~` and environment variables (e.g. `${JMERGE_CACHE}`).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from pathlib import Path
from typing import Any

from jmerge.errors import JmergeError

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
    out = {s["prefer"] for s in searches.values() if s.get("prefer")}
    m = searches.get("masks")
    return out | ({m["data"]} if m and m["objective"] == "dpo" else set())


def _path(v, where: str) -> Path:
    """`~`, environment variables and `{cache}` (the jmerge cache root) expanded."""
    if not isinstance(v, str) or not v:
        raise JmergeError(f"{where}: expected a path, got {v!r}")
    from jmerge.default_model import cache_root
    return Path(os.path.expandvars(os.path.expanduser(v.replace("{cache}", str(cache_root())))))


def _check_keys(d: dict, allowed, where: str) -> None:
    if not isinstance(d, dict):
        raise JmergeError(f"{where}: expected a mapping, got {type(d).__name__}")
    for k in d:
        if k not in allowed:
            close = difflib.get_close_matches(str(k), list(allowed), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise JmergeError(f"{where}: unknown key {k!r}{hint}; allowed: {', '.join(allowed)}")


def _fill(d: dict | None, defaults: dict, where: str) -> dict:
    d = dict(d or {})
    _check_keys(d, defaults, where)
    out = dict(defaults)
    for k, v in d.items():
        want = defaults[k]
        if isinstance(want, bool) and not isinstance(v, bool):
            raise JmergeError(f"{where}.{k}: expected true/false, got {v!r}")
        if isinstance(want, (int, float)) and not isinstance(want, bool):
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise JmergeError(f"{where}.{k}: expected a number, got {v!r}")
            v = type(want)(v) if isinstance(want, float) or float(v).is_integer() else v
        out[k] = v
    return out


def parse(raw: Any, source: Path | None = None) -> SearchConfig:
    where = str(source) if source else "config"
    _check_keys(raw, TOP, where)
    cfg = _fill(raw, TOP, where)
    for req in ("base", "experts", "data", "searches", "out"):
        if raw.get(req) in (None, {}, []):
            raise JmergeError(f"{where}: missing required key {req!r}")
    if not isinstance(cfg["experts"], dict):
        raise JmergeError(f"{where}.experts: expected a mapping name -> model path")
    experts = {str(k): _path(v, f"{where}.experts.{k}") for k, v in cfg["experts"].items()}
    data = {}
    _check_keys(cfg["data"], cfg["data"], f"{where}.data")
    for name, spec in cfg["data"].items():
        spec = {"path": spec} if isinstance(spec, str) else spec
        _check_keys(spec, ("path", "weight", "source", "tokens"), f"{where}.data.{name}")
        w, src, tokens = spec.get("weight", 1.0), spec.get("source"), spec.get("tokens")
        if not isinstance(w, (int, float)) or w < 0:
            raise JmergeError(f"{where}.data.{name}.weight: expected a number >= 0, got {w!r}")
        if src is not None and (not isinstance(src, str) or not src):
            raise JmergeError(f"{where}.data.{name}.source: expected a glob on the rows' source field, got {src!r}")
        if tokens is not None and (not isinstance(tokens, int) or isinstance(tokens, bool) or tokens <= 0):
            raise JmergeError(f"{where}.data.{name}.tokens: expected a positive whole number of answer tokens, "
                              f"got {tokens!r}")
        data[str(name)] = DataSpec(_path(spec.get("path"), f"{where}.data.{name}.path"), float(w), src, tokens)
    _check_keys(cfg["searches"], SEARCHES, f"{where}.searches")
    searches = {k: _fill(v, SEARCHES[k], f"{where}.searches.{k}") for k, v in cfg["searches"].items()}
    for name, s in searches.items():
        if s.get("steps", 1) <= 0 or s.get("generations", 1) <= 0:
            raise JmergeError(f"{where}.searches.{name}: steps/generations must be positive")
    if "masks" in searches:
        m, at = searches["masks"], f"{where}.searches.masks"
        if m["safe"] is not None and m["safe"] not in experts:
            raise JmergeError(f"{at}.safe: {m['safe']!r} is not one of the experts ({', '.join(experts)})")
        if m["data"] is not None and m["data"] not in data:
            raise JmergeError(f"{at}.data: {m['data']!r} is not a data type")
        if m["objective"] not in ("ce", "dpo"):
            raise JmergeError(f"{at}.objective: expected ce or dpo, got {m['objective']!r}")
        if m["objective"] == "dpo" and m["data"] is None:
            raise JmergeError(f"{at}.data: objective dpo needs the data type of its "
                              "{prompt, chosen, rejected} rows")
        if m["objective"] == "dpo" and m["prefer"] is not None:
            raise JmergeError(f"{at}.prefer: objective dpo is DPO on `data` alone; prefer adds a DPO "
                              "term to the ce objective")
    for name in ("coefficients", "masks"):
        s, at = searches.get(name), f"{where}.searches.{name}"
        if s is None or (s.get("objective", "ce") == "ce" and s["prefer"] is None):
            continue
        if s["prefer"] is not None and s["prefer"] not in data:
            raise JmergeError(f"{at}.prefer: {s['prefer']!r} is not a data type")
        if not s["beta"] > 0:
            raise JmergeError(f"{at}.beta: expected a number > 0, got {s['beta']!r}")
        if s["reference"] != "base" and s["reference"] not in experts:
            raise JmergeError(f"{at}.reference: {s['reference']!r} is neither 'base' nor one of the "
                              f"experts ({', '.join(experts)})")
    preference = preference_types(searches)
    for name, s in searches.items():
        if s.get("objective", "ce") == "ce" and s.get("data") in preference:
            raise JmergeError(f"{where}.searches.{name}.data: {s['data']!r} holds preference rows, not CE pairs")
    # Preference rows carry no CE weight: the weights that must not all be 0 are the CE types',
    # and only when a search optimises CE.
    needs_ce = bool({"coefficients", "evolve", "cocktail"} & set(searches)) or \
        searches.get("masks", {}).get("objective") == "ce"
    if needs_ce and sum(d.weight for n, d in data.items() if n not in preference) == 0:
        raise JmergeError(f"{where}.data: the weights sum to 0, so there is nothing to optimise")
    if "sweep" in searches:
        for role in ("domain", "align"):
            if searches["sweep"][role] not in experts:
                raise JmergeError(f"{where}.searches.sweep.{role}: {searches['sweep'][role]!r} is not one of the experts")
    for b in cfg["baselines"]:
        if b not in BASELINES:
            close = difflib.get_close_matches(str(b), BASELINES, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise JmergeError(f"{where}.baselines: unknown baseline {b!r}{hint}; known: {', '.join(BASELINES)}")
    ev = _fill(cfg["eval"], EVAL, f"{where}.eval")
    for k in ("domain", "benign", "data"):
        if ev[k] is not None and not (k == "benign" and ev[k] == "builtin"):
            ev[k] = _path(ev[k], f"{where}.eval.{k}")
    return SearchConfig(base=_path(cfg["base"], f"{where}.base"), experts=experts, data=data, searches=searches,
                        baselines=list(cfg["baselines"]), eval=ev, out=_path(cfg["out"], f"{where}.out"),
                        max_len=int(cfg["max_len"]), seed=int(cfg["seed"]), checkpoint_every=int(cfg["checkpoint_every"]),
                        dtype=str(cfg["dtype"]), mesh=cfg["mesh"], source=source, raw=raw)


def load(path: str | Path) -> SearchConfig:
    import yaml
    path = Path(path)
    if not path.is_file():
        raise JmergeError(f"{path}: no such config file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark else ""
        raise JmergeError(f"{path}: YAML syntax error{line}: {getattr(e, 'problem', e)}") from None
    return parse(raw, path)
