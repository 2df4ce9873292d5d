"""arcee_fusion: keep the other model's change only where its importance is an outlier
(mergekit `arcee_fusion`)."""

import jax
import jax.numpy as jnp
import numpy as np

from jmerge.merge._geometry import f32, result_dtype
from jmerge.merge.registry import register

# mergekit estimates the quantiles from at most this many entries.
QUANTILE_SAMPLE = 1_000_000


def importance(theta: jax.Array, base: jax.Array) -> jax.Array:
    """|θ − θ_base| times the KL divergence, per vector along the last axis, between
    softmax(θ) and softmax(θ_base) (each + 1e-8)."""
    p = jax.nn.softmax(theta, axis=-1) + 1e-8
    q = jax.nn.softmax(base, axis=-1) + 1e-8
    kl = jnp.sum(p * jnp.log(p / q), axis=-1, keepdims=True)
    return jnp.abs(theta - base) * kl


def outlier_threshold(scores: jax.Array) -> jax.Array:
    """median + 1.5·(q3 − q1), quantiles taken as sorted[floor(q·(n−1))] like mergekit.

    Tensors of up to 1M entries use every entry (exact). Larger ones use a deterministic
    subsample of 1M entries at indices floor(i·n/1M), evenly spread over the flat tensor, where
    mergekit draws 1M indices at random with replacement.
    """
    flat = scores.reshape(-1)
    n = flat.shape[0]
    if n > QUANTILE_SAMPLE:
        idx = (np.arange(QUANTILE_SAMPLE, dtype=np.int64) * n) // QUANTILE_SAMPLE
        flat = flat[jnp.asarray(idx)]
        n = QUANTILE_SAMPLE
    s = jnp.sort(flat)
    q1, med, q3 = s[(n - 1) // 4], s[(n - 1) // 2], s[3 * (n - 1) // 4]
    return med + 1.5 * (q3 - q1)


@register("arcee_fusion", base="required", min_models=1, max_models=1)
def arcee_fusion(base, models, *, key=None):
    """θ = θ_base + Δ·1[importance ≥ median + 1.5·IQR], Δ = θ₁ − θ_base; no parameters."""
    v0, v1 = f32(base), f32(models[0])
    if v0.ndim == 0:
        v0, v1 = v0.reshape(1), v1.reshape(1)
    score = importance(v1, v0)
    keep = score >= outlier_threshold(score)
    out = v0 + (v1 - v0) * keep
    return out.reshape(jnp.shape(base)).astype(result_dtype(base, models))
