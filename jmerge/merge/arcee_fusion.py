"""arcee_fusion: keep the other model's change only where its importance is an outlier
(mergekit `arcee_fusion`)."""

import jax
import jax.numpy as jnp
import numpy as np

from jmerge.merge._geometry import f32, result_dtype
from jmerge.merge.registry import register

# mergekit estimates the quantiles from at most this many entries.
QUANTILE_SAMPLE = 1_000_000
EPS = 1e-8  # mergekit adds it to both softmaxes
# Taylor coefficients (n - 1) / n! of g(w) = 1 + (w - 1) e^w, for n = 2 .. 9
_G_SERIES = (1 / 2, 1 / 3, 1 / 8, 1 / 30, 1 / 144, 1 / 840, 1 / 5760, 1 / 45360)


def _g(w: jax.Array) -> jax.Array:
    """1 + (w - 1) e^w >= 0, ~ w^2 / 2: by its series where the closed form would cancel."""
    small = jnp.abs(w) < 0.5
    ws = jnp.where(small, w, 0.0)
    series = jnp.zeros_like(w)
    for c in reversed(_G_SERIES):
        series = series * ws + c
    wl = jnp.where(small, 1.0, w)
    return jnp.where(small, series * ws * ws, 1 + (wl - 1) * jnp.exp(wl))


def kl_rows(theta: jax.Array, base: jax.Array) -> jax.Array:
    """mergekit's KL(p || q) with p, q = softmax(θ), softmax(θ_base) (+ 1e-8 each), per vector
    along the last axis, evaluated to ~1e-7 relative in float32.

    The plain sum of p log(p / q) cancels almost entirely when p ≈ q (a fine-tune): its
    float32 rounding error ranges from 1e-3 of the KL to many times it, and differs between
    XLA and PyTorch, which made jmerge and mergekit keep different entries near the threshold
    (mergekit's KL keeps its own error, so entries within it of the threshold may still
    differ). Here, with q' = q + ε,
    p' = q' e^w and Σp' = Σq': KL = Σ q' g(w), a sum of non-negative terms, and
    w = log(p'/q') comes from the logit differences, not from two rounded softmaxes.
    """
    q = jax.nn.softmax(base, axis=-1)
    d = theta - base
    c = jnp.sum(q * d, axis=-1, keepdims=True)  # centre: Σ q δ = 0 below
    delta = d - c
    # log p - log q = δ - log Σ q e^δ, with log Σ q e^δ = log1p(Σ q expm1(δ)) (Σ q = 1)
    fits = jnp.max(delta, axis=-1, keepdims=True) < 60  # expm1 stays finite
    s = jnp.sum(q * jnp.expm1(jnp.minimum(delta, 60.0)), axis=-1, keepdims=True)
    lse = (jax.nn.logsumexp(theta, axis=-1, keepdims=True)
           - jax.nn.logsumexp(base, axis=-1, keepdims=True) - c)
    z = delta - jnp.where(fits, jnp.log1p(s), lse)
    # w = z + log((1 + ε/p) / (1 + ε/q)), written to stay exact for small z
    near = jnp.abs(z) < 1
    zn = jnp.where(near, z, 0.0)
    w_near = zn + jnp.log1p(EPS * jnp.expm1(-zn) / (q + EPS))
    w_far = jnp.log(jax.nn.softmax(theta, axis=-1) + EPS) - jnp.log(q + EPS)
    w = jnp.where(near, w_near, w_far)
    return jnp.sum((q + EPS) * _g(w), axis=-1, keepdims=True)


def importance(theta: jax.Array, base: jax.Array) -> jax.Array:
    """|θ − θ_base| times the KL divergence, per vector along the last axis, between
    softmax(θ) and softmax(θ_base) (each + 1e-8); see kl_rows."""
    return jnp.abs(theta - base) * kl_rows(theta, base)


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


@register("arcee_fusion", base="required", min_models=1, max_models=1, pair=True)
def arcee_fusion(base, models, *, key=None):
    """θ = θ_base + Δ·1[importance ≥ median + 1.5·IQR], Δ = θ₁ − θ_base; no parameters."""
    v0, v1 = f32(base), f32(models[0])
    if v0.ndim == 0:
        v0, v1 = v0.reshape(1), v1.reshape(1)
    score = importance(v1, v0)
    keep = score >= outlier_threshold(score)
    out = v0 + (v1 - v0) * keep
    return out.reshape(jnp.shape(base)).astype(result_dtype(base, models))
