"""SCE (FuseChat 2408.07990): Select by variance, Calculate weights, Erase minority signs."""

import jax.numpy as jnp

from jmerge.errors import JmergeError
from jmerge.merge._consensus import agreement, elect_sign
from jmerge.merge._sparsify import topk_mask_k
from jmerge.merge.registry import register


def select_mask(tvs, select_topk):
    """Positions whose variance across models is among the top k of the positions with nonzero
    variance (exactly k, ties by index); all positions if select_topk >= 1.

    k = int(nonzero * select_topk) as mergekit 0.1.5 computes it: the count is a torch tensor
    there, so the product is float32 and truncated (0 keeps nothing). Being float32, the same
    rule is exact here for traced and planned values alike."""
    mean = sum(tvs) / len(tvs)
    var = sum(jnp.square(t - mean) for t in tvs) / len(tvs)
    nonzero = jnp.sum(var != 0, dtype=jnp.int32)
    k = jnp.floor(nonzero.astype(jnp.float32) * jnp.asarray(select_topk, jnp.float32))
    k = jnp.clip(k, 0, nonzero).astype(jnp.int32)
    return (jnp.asarray(select_topk) >= 1) | topk_mask_k(var, k)


@register("sce", model_params={}, global_params={"int8_mask": False, "select_topk": 1.0})
def sce(base, models, *, key=None, int8_mask=False, select_topk=1.0):
    """theta_0 + sum_i c_i tau_i m_i / sum_i c_i m_i, where tau_i is restricted to the
    top-variance positions, c_i = mean(tau_i^2) / sum_j mean(tau_j^2) (uniform if that sum is
    < 1e-6) and m_i marks agreement with sign(sum_j tau_j). User weights are not used."""
    if base is None:
        raise JmergeError("sce: a base model is required")
    b = jnp.asarray(base).astype(jnp.float32)
    tvs = [jnp.asarray(m).astype(jnp.float32) - b for m in models]
    selected = select_mask(tvs, select_topk)
    tvs = [jnp.where(selected, t, 0.0) for t in tvs]

    energy = [jnp.mean(jnp.square(t)) for t in tvs]
    total = sum(energy)
    small = jnp.abs(total) < 1e-6
    coef = [jnp.where(small, 1.0 / len(tvs), e / jnp.where(small, 1.0, total)) for e in energy]

    agree = agreement(tvs, elect_sign(tvs))
    kept = [jnp.where(a, c, 0.0) for a, c in zip(agree, coef)]
    merged = sum(t * c for t, c in zip(tvs, kept)) / jnp.maximum(sum(kept), 1e-6)
    return (b + merged).astype(jnp.asarray(base).dtype)
