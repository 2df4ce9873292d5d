"""Sparsifiers for task vectors: exact magnitude top-k without sorting, DARE, breadcrumbs, DELLA.

Every function works on one HF tensor in float32 and takes its parameters as (possibly traced)
scalars, so it jits once and vmaps over a stacked layer axis.

Magnitude order is taken on the float32 bit pattern with the sign bit cleared: for non-NaN
values that uint32 order is exactly the order of |x| (and -0.0 is +0.0). The k-th largest
magnitude is found by bisection on those bits, 32 steps of one compare+count each.

Rounding: a density becomes k = round(density * n) (half up, in float32). mergekit truncates
(`int(density * n)`), so jmerge may keep one entry more; float32 cannot reproduce Python's
double product anyway.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_SIGN_OFF = 0x7FFFFFFF
_INF_BITS = 0x7F800000
_LO_BITS = 16  # global counts are carried as hi * 2**16 + lo in int32 (no x64 needed)
_LO_MASK = (1 << _LO_BITS) - 1


def abs_bits(x: jax.Array) -> jax.Array:
    """|x| as float32 bits in uint32; integer order == magnitude order (NaN sorts above inf)."""
    bits = lax.bitcast_convert_type(jnp.asarray(x).astype(jnp.float32), jnp.uint32)
    return bits & jnp.uint32(_SIGN_OFF)


def _bits_to_float(bits: jax.Array) -> jax.Array:
    return lax.bitcast_convert_type(bits, jnp.float32)


def _bisect_bits(enough) -> jax.Array:
    """Largest bit pattern t with enough(t) true, for a predicate monotone non-increasing in t.

    Invariant: enough(lo) and not enough(hi). enough(0) must hold; hi starts just above +inf.
    """
    def step(_, lo_hi):
        lo, hi = lo_hi
        mid = lo + (hi - lo) // 2
        ok = enough(mid)
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo, _ = lax.fori_loop(0, 32, step, (jnp.uint32(0), jnp.uint32(_INF_BITS + 1)))
    return lo


def _kth_bits(u: jax.Array, k: jax.Array) -> jax.Array:
    return _bisect_bits(lambda t: jnp.sum(u >= t, dtype=jnp.int32) >= k)


def density_to_k(density, n: int) -> jax.Array:
    """Number of entries a density keeps out of n: round(density * n), clipped to [0, n]."""
    k = jnp.floor(jnp.asarray(density, jnp.float32) * jnp.float32(n) + 0.5)
    return jnp.clip(k, 0, n).astype(jnp.int32)


@jax.jit
def kth_largest_abs(x: jax.Array, k) -> jax.Array:
    """Exact k-th largest |x| (float32), k counted from 1 and clipped to [1, x.size].

    Counts are int32, so x must have fewer than 2**31 elements (true of every HF tensor).
    """
    u = abs_bits(x).reshape(-1)
    k = jnp.clip(jnp.asarray(k, jnp.int32), 1, u.size)
    return _bits_to_float(_kth_bits(u, k))


@jax.jit
def topk_mask_k(x: jax.Array, k) -> jax.Array:
    """Boolean mask of exactly k entries of largest |x| (mergekit's per-tensor scope).

    Ties at the threshold go to the lowest flat indices, so exactly k survive and the masks for
    growing k are nested (the order is |x| descending, then flat index ascending).
    """
    u = abs_bits(x).reshape(-1)
    k = jnp.clip(jnp.asarray(k, jnp.int32), 0, u.size)
    t = _kth_bits(u, jnp.maximum(k, 1))
    above = u > t
    tie = u == t
    room = k - jnp.sum(above, dtype=jnp.int32)  # how many tied entries still fit
    keep = above | (tie & (jnp.cumsum(tie, dtype=jnp.int32) <= room))
    return keep.reshape(jnp.shape(x))


def topk_mask(x: jax.Array, density) -> jax.Array:
    """Mask keeping exactly round(density * x.size) entries of largest magnitude."""
    return topk_mask_k(x, density_to_k(density, int(np.prod(jnp.shape(x)))))


# ---- global scope (TIES paper: one threshold over every tensor of a task vector) -------------

def _split_count(c: jax.Array) -> tuple[jax.Array, jax.Array]:
    return c >> _LO_BITS, c & _LO_MASK


def _pair_ge(hi, lo, k_hi, k_lo) -> jax.Array:
    """hi * 2**16 + lo >= k_hi * 2**16 + k_lo without forming either product in int32."""
    d_lo = lo - k_lo
    d_hi = hi - k_hi + jnp.floor_divide(d_lo, 1 << _LO_BITS)
    return d_hi >= 0  # the remainder d_lo mod 2**16 is in [0, 2**16)


def _k_pair(k, n_total: int) -> tuple[jax.Array, jax.Array]:
    if isinstance(k, (int, np.integer)):
        k = min(max(int(k), 1), n_total)
        return jnp.int32(k >> _LO_BITS), jnp.int32(k & _LO_MASK)
    k = jnp.clip(jnp.asarray(k, jnp.int32), 1, min(n_total, 2**31 - 1))
    return _split_count(k)


@jax.jit
def _global_kth_bits(us: list[jax.Array], k_hi: jax.Array, k_lo: jax.Array) -> jax.Array:
    def enough(t):
        hi = jnp.int32(0)
        lo = jnp.int32(0)
        for u in us:
            c_hi, c_lo = _split_count(jnp.sum(u >= t, dtype=jnp.int32))
            hi, lo = hi + c_hi, lo + c_lo
        return _pair_ge(hi, lo, k_hi, k_lo)

    return _bisect_bits(enough)


def global_kth_largest_abs(xs: Sequence[jax.Array], k) -> jax.Array:
    """Exact k-th largest magnitude over all arrays in xs together (k clipped to [1, total]).

    k: a Python int (any size, exact) or an int32 scalar (may be traced). Each array is counted
    in int32 (each has < 2**31 elements); the counts are summed as an int32 pair hi * 2**16 + lo,
    which is exact up to 2**15 arrays of 2**31 elements each, with no jax_enable_x64.
    """
    us = [abs_bits(x).reshape(-1) for x in xs]
    k_hi, k_lo = _k_pair(k, sum(int(u.size) for u in us))
    return _bits_to_float(_global_kth_bits(us, k_hi, k_lo))


def global_topk_threshold(xs: Sequence[jax.Array], density) -> jax.Array:
    """Magnitude threshold keeping the top `density` fraction of all entries of xs together.

    Keep `|x| >= threshold` (ties kept, as in the TIES paper's kthvalue). A Python float density
    gives the exact k = round(density * total) (at least 1); a traced density computes k in
    float32, off by at most ~1e-7 * total ranks.
    """
    n_total = sum(int(np.prod(jnp.shape(x))) for x in xs)
    if isinstance(density, (int, float, np.floating, np.integer)):
        return global_kth_largest_abs(xs, int(np.floor(float(density) * n_total + 0.5)))
    k = jnp.clip(jnp.floor(jnp.asarray(density, jnp.float32) * jnp.float32(n_total) + 0.5),
                 1, n_total)
    k_hi = jnp.floor(k / (1 << _LO_BITS))
    k_lo = k - k_hi * (1 << _LO_BITS)
    us = [abs_bits(x).reshape(-1) for x in xs]
    return _bits_to_float(_global_kth_bits(us, k_hi.astype(jnp.int32), k_lo.astype(jnp.int32)))


# ---- sparsifiers (mergekit's magnitude / random / magnitude_outliers / della_magprune) --------

def rescale_masked(tv: jax.Array, keep: jax.Array, rescale) -> jax.Array:
    """tv * keep; with `rescale`, scaled so its L1 norm equals tv's (mergekit RescaleNorm.l1).

    As in mergekit, no scaling when either norm is below 1e-7.
    """
    masked = jnp.where(keep, tv, 0.0)
    before = jnp.sum(jnp.abs(tv))
    after = jnp.sum(jnp.abs(masked))
    ok = jnp.asarray(rescale, bool) & (before >= 1e-7) & (after >= 1e-7)
    return masked * jnp.where(ok, before / jnp.where(ok, after, 1.0), 1.0)


def magnitude(tv: jax.Array, density, rescale=False) -> jax.Array:
    """Keep the round(density * n) largest-|tv| entries (TIES trim, per tensor)."""
    out = rescale_masked(tv, topk_mask(tv, density), rescale)
    return jnp.where(jnp.asarray(density) >= 1, tv, out)


def bernoulli(tv: jax.Array, density, key: jax.Array, rescale=True) -> jax.Array:
    """DARE: keep each entry with probability `density`; rescale matches the L1 norm before the
    drop (mergekit), not the paper's 1/density."""
    keep = jax.random.bernoulli(key, jnp.asarray(density, jnp.float32), jnp.shape(tv))
    out = rescale_masked(tv, keep, rescale)
    return jnp.where(jnp.asarray(density) >= 1, tv, out)


def magnitude_outliers(tv: jax.Array, density, gamma, rescale=False) -> jax.Array:
    """Model Breadcrumbs: drop the top `gamma` fraction by |tv|, keep the next `density` fraction.

    If gamma + density > 1 fewer outliers are dropped so that the density is still met.
    (mergekit keeps nothing when round(gamma * n) == 0, a slicing bug; here all top entries stay.)
    """
    n = int(np.prod(jnp.shape(tv)))
    n_keep = density_to_k(density, n)
    n_top = jnp.minimum(density_to_k(gamma, n), n - n_keep)
    keep = topk_mask_k(tv, n_top + n_keep) & ~topk_mask_k(tv, n_top)
    out = rescale_masked(tv, keep, rescale)
    return jnp.where(jnp.asarray(density) >= 1, tv, out)


def della_keep_prob(tv: jax.Array, density, epsilon) -> jax.Array:
    """DELLA MagPrune keep probabilities: per row (last axis), rising linearly with the rank of
    |tv| from density - epsilon (smallest) to density + epsilon (largest).

    Ties rank by index. A row of one entry gets the middle value, density (mergekit: 0/0).
    """
    shape = jnp.shape(tv)
    rows = abs_bits(tv).reshape(-1, shape[-1] if shape else 1)
    m = rows.shape[-1]
    rank = jnp.argsort(jnp.argsort(rows, axis=-1, stable=True), axis=-1, stable=True)
    rank_norm = rank.astype(jnp.float32) / (m - 1) if m > 1 else jnp.full(rows.shape, 0.5)
    eps = jnp.asarray(epsilon, jnp.float32)
    p = jnp.asarray(density, jnp.float32) - eps + rank_norm * (2 * eps)
    return p.reshape(shape)


def della_magprune(tv: jax.Array, density, epsilon, key: jax.Array, rescale=True) -> jax.Array:
    """DELLA: Bernoulli drop with rank-based keep probabilities, then mergekit's L1 rescale (the
    paper divides each kept entry by its own probability instead)."""
    keep = jax.random.bernoulli(key, della_keep_prob(tv, density, epsilon))
    out = rescale_masked(tv, keep, rescale)
    density = jnp.asarray(density)
    return jnp.where(density >= 1, tv, jnp.where(density <= 0, 0.0, out))
