"""TIES sign election, the (disjoint) weighted combination, and the generalized task arithmetic
pipeline every GTA-style method shares:

    tau_i = theta_i - theta_0  ->  sparsify  ->  [elect sign]  ->  sum_i w_i tau_i [m_i]
          ->  [/ normalizer]  ->  * lambda  ->  theta_0 + ...

Semantics follow mergekit's `generalized_task_arithmetic.py`: the sign is elected on the
*weighted* task vectors (sign(sum_i w_i tau_i), ties to +), an entry of model i survives when
sign(w_i tau_i) equals it (zeros never do), and the normalizer is sum_i w_i m_i (1 where 0) with
consensus or sum_i w_i (1 where |.| < 1e-8) without. All arithmetic is float32; models are kept
as a list of separate arrays (no stacked K x tensor copy).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jmerge.errors import JmergeError

F32 = jnp.float32


def elect_sign(weighted: Sequence[jax.Array]) -> jax.Array:
    """+1 / -1 per entry: the sign of the sum of the weighted task vectors (0 counts as +)."""
    return jnp.where(sum(weighted) >= 0, F32(1), F32(-1))


def agreement(weighted: Sequence[jax.Array], sign: jax.Array) -> list[jax.Array]:
    """Per model, where its (weighted) entry is nonzero and has the elected sign."""
    return [jnp.sign(w) == sign for w in weighted]


def combine(deltas: Sequence[jax.Array], weights: Sequence[Any], *, consensus: bool, normalize,
            lam=1.0) -> jax.Array:
    """lambda * sum_i w_i d_i [m_i] / normalizer (normalizer only if `normalize`)."""
    w = [jnp.asarray(wi, F32) for wi in weights]
    weighted = [wi * d for wi, d in zip(w, deltas)]
    if consensus:
        agree = agreement(weighted, elect_sign(weighted))
        mixed = sum(jnp.where(a, x, 0.0) for a, x in zip(agree, weighted))
        divisor = sum(jnp.where(a, wi, 0.0) for a, wi in zip(agree, w))
        divisor = jnp.where(divisor == 0, F32(1), divisor)
    else:
        mixed = sum(weighted)
        divisor = sum(w)
        divisor = jnp.where(jnp.abs(divisor) < 1e-8, F32(1), divisor)
    mixed = jnp.where(jnp.asarray(normalize, bool), mixed / divisor, mixed)
    return mixed * jnp.asarray(lam, F32)


# ---- parameters ------------------------------------------------------------------------------

def per_model(value, n: int, name: str, method: str) -> list:
    """A per-model parameter as a list of n scalars (a scalar is broadcast to every model)."""
    if value is None:
        raise JmergeError(f"{method}: per-model parameter {name!r} is required")
    if isinstance(value, (list, tuple)):
        vals = list(value)
    elif jnp.ndim(value) == 1:
        vals = [value[i] for i in range(jnp.shape(value)[0])]
    else:
        vals = [value] * n
    if len(vals) != n:
        raise JmergeError(f"{method}: {name!r} has {len(vals)} values for {n} models")
    return vals


def gta_params(*, normalize: bool, rescale: bool, **model_extra) -> tuple[dict, dict]:
    """mergekit's GTA parameter schema: (per-model defaults, global defaults).

    `weight` has no default (None marks it required).
    """
    model = {"weight": None, "density": 1.0, **model_extra}
    glob = {"int8_mask": False, "normalize": normalize, "rescale": rescale, "lambda": 1.0}
    return model, glob


Sparsifier = Callable[[jax.Array, int, dict, Any], jax.Array]
# All task vectors of a tensor at once (a list in, a list out), for a trim that reads them together.
JointSparsifier = Callable[[list, dict], list]


def gta_merge(method: str, base: jax.Array, models: Sequence[jax.Array], params: dict,
              defaults: tuple[dict, dict], *, sparsify: Sparsifier | None = None,
              consensus: bool = False, key: jax.Array | None = None,
              tv_as_pair: bool = False, sparsify_all: JointSparsifier | None = None) -> jax.Array:
    """Generalized task arithmetic over one tensor; returns base's dtype.

    `sparsify(tv, i, p, key_i)` trims model i's task vector; p holds the per-model parameters as
    lists and the global ones as scalars. Model i's randomness is fold_in(key, i). With
    `tv_as_pair`, tv is passed as the pair (model_i, base), for a sparsifier that reads it in
    several passes and recomputes the float32 difference in each (see _sparsify.TaskVector).
    `sparsify_all(tvs, p)` trims them all in one call instead (as pairs with `tv_as_pair`).
    """
    if base is None:
        raise JmergeError(f"{method}: a base model is required")
    model_defaults, global_defaults = defaults
    p = {**global_defaults, **{k: v for k, v in params.items() if k not in model_defaults}}
    n = len(models)
    for name, default in model_defaults.items():
        p[name] = per_model(params.get(name, default), n, name, method)
    b = jnp.asarray(base).astype(F32)
    tvs = [(jnp.asarray(m), jnp.asarray(base)) if tv_as_pair else jnp.asarray(m).astype(F32) - b
           for m in models]
    if sparsify_all is not None:
        deltas = sparsify_all(tvs, p)
    elif sparsify is not None:
        deltas = [sparsify(tv, i, p, None if key is None else jax.random.fold_in(key, i))
                  for i, tv in enumerate(tvs)]
    else:
        deltas = [jnp.asarray(m).astype(F32) - b for m in models]
    mixed = combine(deltas, p["weight"], consensus=consensus, normalize=p["normalize"],
                    lam=p["lambda"])
    return (b + mixed).astype(jnp.asarray(base).dtype)


def require_key(method: str, key) -> None:
    if key is None:
        raise JmergeError(f"{method}: needs a random key (set a seed)")
