"""One registry of merge methods, each a pure function over the arrays of one HF tensor.

A method is called once per Hugging Face tensor (the engine vmaps it over the stacked layer axis),
so "per tensor" means what it means in mergekit. Signature:

    fn(base, models, *, key, **params) -> merged array

- `base`: the base model's tensor, or None when the method takes no base.
- `models`: list of the other models' tensors, same shape and dtype as `base`.
- `key`: a PRNG key derived from (seed, HF tensor name), or None for deterministic methods.
- per-model parameters arrive as sequences with one scalar per model (they may be traced JAX
  scalars, so no Python control flow on their values); global parameters as scalars.
The result has the dtype of the inputs' promotion; the engine casts to `out_dtype`.

Everything the planner and the engine need to know about a method is declared here, at
registration: its parameters (defaults, ranges, which are shape-changing), how many models it
takes, whether it needs a base, data or a PRNG key. Nothing asks a method by name.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

from jmerge.errors import JmergeError


@dataclasses.dataclass(frozen=True)
class Range:
    """The numbers a parameter may take, e.g. density in (0, 1]."""
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, v) -> bool:
        above = v > self.low if self.low_open else v >= self.low
        below = v < self.high if self.high_open else v <= self.high
        return bool(above and below)

    def __str__(self) -> str:
        return f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


@dataclasses.dataclass(frozen=True)
class Param:
    default: Any  # None: the config must set it
    per_model: bool
    range: Range | None = None
    # Changes shapes or structure: one Python value for the whole merge, passed jit-static.
    static: bool = False
    # A file path (somf's mask), not a number.
    path: bool = False
    # A path whose files may lack a tensor (regmean's Gram matrices exist for linear weights
    # only): the method then gets None for it instead of an error.
    optional: bool = False


# A fraction of a tensor's entries to keep: 0 would keep nothing.
FRACTION = Range(0, 1, low_open=True)


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    fn: Callable[..., Any]
    params: Mapping[str, Param]  # a key missing here is rejected as unknown by the config reader
    base: str = "required"  # "required" | "optional" | "none"
    stochastic: bool = False  # needs `key`
    min_models: int = 1  # besides the base
    max_models: int | None = None
    # Exactly two models, base_model and one other (slerp-like interpolations).
    pair: bool = False
    # One source per slice: the method copies, it does not combine (passthrough).
    single_source: bool = False
    # Some parameter comes from data (somf's masks, learnt by `jmerge search`).
    needs_data: bool = False
    # Each output element depends only on the same element of the inputs (no reduction over the
    # tensor): the engine may then merge all layers of a leaf in one batched call, same bits.
    elementwise: bool = False
    # (planned params, tensor size) -> extra params the host computes before tracing (mergekit's
    # exact kept counts for densities, which float32 cannot reproduce once traced).
    host_params: Callable[[dict, int], dict] | None = None
    # The global flag that normalizes the weights, and whether it divides by their plain sum
    # (linear, multislerp) rather than by 1 where the sum is 0 (the GTA methods, as mergekit).
    normalize_flag: str | None = None
    divides_by_sum: bool = False
    doc: str = ""

    @property
    def model_params(self) -> dict[str, Any]:
        """Per-model parameter names and defaults."""
        return {k: p.default for k, p in self.params.items() if p.per_model}

    @property
    def global_params(self) -> dict[str, Any]:
        return {k: p.default for k, p in self.params.items() if not p.per_model}

    @property
    def static_params(self) -> frozenset:
        return frozenset(k for k, p in self.params.items() if p.static)


METHODS: dict[str, Method] = {}

# Every parameter name of a mergekit 0.1.5 method (the specs of its registry). mergekit resolves
# only the parameters of the chosen method and ignores other names, so a config may set one of
# these on a method that does not take it (`density` on `linear`); jmerge then warns.
MERGEKIT_PARAMS = frozenset({
    "alpha", "density", "eps", "epsilon", "filter_wise", "gamma", "int8_mask", "lambda", "max_iter",
    "normalize", "normalize_weights", "nuslerp_flatten", "nuslerp_row_wise", "r", "rescale", "scale",
    "select_topk", "t", "tol", "weight"})


def _all() -> dict[str, Method]:
    from jmerge import merge  # noqa: F401  (importing the package registers every method)
    return METHODS


def known_params() -> frozenset:
    """Parameter names some merge method takes: mergekit's and those of jmerge's own methods."""
    return MERGEKIT_PARAMS.union(*(set(m.params) for m in _all().values()))


def param_spec(name: str) -> Param | None:
    """How some method declares parameter `name` (a range or a path), for settings checked before
    the method is known to take it (`density` on `linear` is still checked, then ignored)."""
    for m in _all().values():
        p = m.params.get(name)
        if p is not None and (p.range is not None or p.path):
            return p
    return None


def register(name: str, *, model_params=None, global_params=None, ranges=None, static=(), paths=(),
             optional_paths=(), base="required", stochastic=False, min_models=1, max_models=None,
             pair=False, single_source=False, needs_data=False, elementwise=False, host_params=None,
             normalize_flag=None, divides_by_sum=False):
    """Register `fn` as method `name`. `model_params` / `global_params`: name -> default (None:
    required); `ranges`: name -> Range; `static`, `paths`: names of shape-changing / file-path
    parameters; `optional_paths`: those paths whose files may lack a tensor. `normalize_flag`
    defaults to `normalize` when the method has that flag."""
    ranges = dict(ranges or {})
    declared = {**(model_params or {}), **(global_params or {})}
    stray = (set(ranges) | set(static) | set(paths)) - set(declared)
    if stray:
        raise ValueError(f"{name}: metadata for undeclared parameters {sorted(stray)}")
    if set(optional_paths) - set(paths):
        raise ValueError(f"{name}: optional_paths {sorted(set(optional_paths) - set(paths))} are not paths")

    def param(k, default, per_model):
        return Param(default, per_model, ranges.get(k), k in static, k in paths, k in optional_paths)

    params = {**{k: param(k, v, True) for k, v in (model_params or {}).items()},
              **{k: param(k, v, False) for k, v in (global_params or {}).items()}}
    if normalize_flag is None and "normalize" in params:
        normalize_flag = "normalize"

    def wrap(fn):
        METHODS[name] = Method(name, fn, params, base, stochastic, min_models, max_models, pair,
                               single_source, needs_data, elementwise, host_params, normalize_flag,
                               divides_by_sum, (fn.__doc__ or "").strip())
        return fn
    return wrap


def get(name: str) -> Method:
    methods = _all()
    if name not in methods:
        import difflib
        close = difflib.get_close_matches(name, methods, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise JmergeError(f"unknown merge method {name!r}{hint}; known: {', '.join(sorted(methods))}")
    return methods[name]
