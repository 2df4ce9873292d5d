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
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from jmerge.errors import JmergeError


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    fn: Callable[..., Any]
    # Defaults; a key missing here is rejected as unknown by the config reader.
    model_params: dict[str, Any]
    global_params: dict[str, Any]
    base: str = "required"  # "required" | "optional" | "none"
    random: bool = False  # needs `key`
    min_models: int = 1
    max_models: int | None = None
    doc: str = ""
    # Each output element depends only on the same element of the inputs (no reduction over the
    # tensor): the engine may then merge all layers of a leaf in one batched call, same bits.
    elementwise: bool = False


METHODS: dict[str, Method] = {}

# Every parameter name of a mergekit 0.1.5 method (the specs of its registry). mergekit resolves
# only the parameters of the chosen method and ignores other names, so a config may set one of
# these on a method that does not take it (`density` on `linear`); jmerge then warns.
MERGEKIT_PARAMS = frozenset({
    "alpha", "density", "eps", "epsilon", "filter_wise", "gamma", "int8_mask", "lambda", "max_iter",
    "normalize", "normalize_weights", "nuslerp_flatten", "nuslerp_row_wise", "r", "rescale", "scale",
    "select_topk", "t", "tol", "weight"})


def known_params() -> frozenset:
    """Parameter names some merge method takes: mergekit's and those of jmerge's own methods."""
    from jmerge import merge  # noqa: F401  (importing the package registers every method)
    return MERGEKIT_PARAMS.union(*(set(m.model_params) | set(m.global_params) for m in METHODS.values()))


def register(name: str, *, model_params=None, global_params=None, base="required", random=False,
             min_models=1, max_models=None, elementwise=False):
    def wrap(fn):
        METHODS[name] = Method(name, fn, dict(model_params or {}), dict(global_params or {}), base,
                               random, min_models, max_models, (fn.__doc__ or "").strip(), elementwise)
        return fn
    return wrap


def get(name: str) -> Method:
    from jmerge import merge  # noqa: F401  (importing the package registers every method)
    if name not in METHODS:
        import difflib
        close = difflib.get_close_matches(name, METHODS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise JmergeError(f"unknown merge method {name!r}{hint}; known: {', '.join(sorted(METHODS))}")
    return METHODS[name]
