"""RAM and RAM+ (Reinforced Agent Merging, 2601.13572), tensor-local as in mergekit.

An entry of tau_i = theta_i - theta_0 is active when |tau_i| > epsilon. Entries active in one
model only ("unique") are kept as they are; entries active in several ("shared") are averaged over
the models that touch them.
"""

import jax.numpy as jnp

from jmerge.errors import JmergeError
from jmerge.merge.registry import register


def _active(base, models, epsilon, method):
    if base is None:
        raise JmergeError(f"{method}: a base model is required")
    b = jnp.asarray(base).astype(jnp.float32)
    tvs = [jnp.asarray(m).astype(jnp.float32) - b for m in models]
    active = [jnp.abs(t) > epsilon for t in tvs]
    count = sum(a.astype(jnp.int32) for a in active)
    return b, tvs, active, count


def _merge(b, tvs, active, count, unique_scale, base):
    unique = count == 1
    share = 1.0 / jnp.maximum(count, 1).astype(jnp.float32)
    merged = sum(jnp.where(a, t * jnp.where(unique, s, share), 0.0)
                 for t, a, s in zip(tvs, active, unique_scale))
    return (b + merged).astype(jnp.asarray(base).dtype)


@register("ram", model_params={}, global_params={"epsilon": 1e-5})
def ram(base, models, *, key=None, epsilon=1e-5):
    """theta_0 + sum_i tau_i a_i / max(count, 1), a_i = |tau_i| > epsilon, count = sum_i a_i."""
    b, tvs, active, count = _active(base, models, epsilon, "ram")
    return _merge(b, tvs, active, count, [1.0] * len(tvs), base)


@register("ramplus_tl", model_params={}, global_params={"r": 0.1, "alpha": 0.2, "epsilon": 1e-5})
def ramplus_tl(base, models, *, key=None, r=0.1, alpha=0.2, epsilon=1e-5):
    """RAM, with model i's unique entries scaled by 1 + r * clip(rho_i, 0, alpha), where
    rho_i = (# shared entries of i) / max(# unique entries of i, epsilon), counted per tensor."""
    b, tvs, active, count = _active(base, models, epsilon, "ramplus_tl")
    unique, shared = count == 1, count > 1
    scales = []
    for a in active:
        n_shared = jnp.sum(a & shared, dtype=jnp.int32).astype(jnp.float32)
        n_unique = jnp.sum(a & unique, dtype=jnp.int32).astype(jnp.float32)
        rho = n_shared / jnp.maximum(n_unique, epsilon)
        scales.append(1.0 + r * jnp.clip(rho, 0.0, alpha))
    return _merge(b, tvs, active, count, scales, base)
