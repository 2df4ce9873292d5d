"""Checking the values of a YAML config: numbers of a kind and range, choices, names and paths,
each problem recorded with where it is so that all of a file's problems are reported at once."""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from pathlib import Path

from jmerge.errors import JmergeError

# Counts, sizes and seeds end up in int32 arrays and PRNG keys.
INT_MAX = 2**31 - 1


def show(v) -> str:
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


def expand_path(v, where: str) -> Path:
    """`~`, environment variables and `{cache}` (the jmerge cache root) expanded."""
    if not isinstance(v, str) or not v:
        raise JmergeError(f"{where}: expected a path, got {show(v)}")
    from jmerge.default_model import cache_root
    return Path(os.path.expandvars(os.path.expanduser(v.replace("{cache}", str(cache_root())))))


def _string_number(v: str, desc: str) -> str:
    from jmerge.io.files import yaml_float
    fix = yaml_float(v)
    if fix is not None and "e" in v.lower() and fix != v.strip():
        return f"{v!r} is a string: YAML 1.1 reads {v} as text; write {fix}"
    if fix is not None:
        return f"{v!r} is a string, expected {desc}; write the number without quotes"
    return f"expected {desc}, got the string {v!r}"


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
            return f"expected {self.desc}, got {show(v)}"
        if isinstance(v, float) and not math.isfinite(v):
            return f"expected {self.desc}, got {show(v)}"
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


class Check:
    """The problems of one config file, gathered so that all of them are reported at once."""

    def __init__(self):
        self.problems: list[str] = []

    def bad(self, at: str, msg: str) -> None:
        self.problems.append(f"{at}: {msg}" if at else msg)

    def mapping(self, d, allowed, at: str) -> bool:
        """Whether d is a mapping; each key outside `allowed` is a problem with a did-you-mean."""
        if not isinstance(d, dict):
            self.bad(at, f"expected a mapping, got {show(d)}")
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
        self.bad(at, f"expected {' or '.join(options)}, got {show(v)}{hint}")
        return None

    def path(self, v, at: str) -> Path | None:
        try:
            return expand_path(v, at)
        except JmergeError as e:
            self.problems.append(str(e))
            return None

    def one_of(self, v, names, what: str, at: str) -> bool:
        """Whether v names one of `names` (experts, data types)."""
        if isinstance(v, str) and v in names:
            return True
        self.bad(at, f"{show(v)} is not {what} ({', '.join(map(str, names)) or 'none given'})")
        return False

    def numbers(self, v, rule: Num, at: str) -> list | None:
        """A non-empty list of numbers of `rule` (a grid)."""
        if not isinstance(v, list) or not v:
            self.bad(at, f"expected a non-empty list of numbers, got {show(v)}")
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
                self.bad(key_at, f"expected true or false, got {show(v)}")
                v = None
            out[k] = v
        return out
