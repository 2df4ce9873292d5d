"""Sparsifiers for task vectors: exact magnitude top-k without sorting, DARE, breadcrumbs, DELLA.

Every function works on one HF tensor in float32 and takes its parameters as (possibly traced)
scalars, so it jits once and vmaps over a stacked layer axis.

Magnitude order is taken on the float32 bit pattern with the sign bit cleared: for non-NaN
values that uint32 order is exactly the order of |x| (and -0.0 is +0.0). The k-th largest
magnitude T is the largest bit pattern t in [0, +inf] with #{u >= t} >= k. It is found by a
multi-way search: each pass over the tensor counts #{u >= t} for 4 thresholds at once (one
read), which narrows the interval [lo, hi) holding T to one of five parts. The first two passes
take their thresholds from a small sorted sample of the tensor: a guess v of T and v + 1, which
ends the search when T == v (usual for deltas of bf16 weights, where many entries share each
magnitude), and two values about 4 sample sigmas either side. Later passes split [lo, hi)
evenly, so no tensor needs more than 16 passes (plain bisection needs 32). The sample only
decides the speed, never the result. Ties at T go to the lowest flat indices, found from per-row
tie counts, only when ties must be broken. The first pass counts per row, so when T == v those
counts are already there; otherwise they take one more pass. Several task vectors of one tensor
(TIES) make their first passes in one read of them all.

A magnitude top-k also takes a task vector as the pair (model, base), standing for
float32(model) - float32(base): the difference is then recomputed inside every pass rather
than stored. On XLA:CPU that is cheaper, because a fresh 4-byte-per-entry buffer costs a page
fault per 4 KiB, more than the arithmetic.

Rounding. A density known on the host (a Python number: every density of a merge YAML, which
the engine hands in as counts through a method's `host_params`) keeps exactly mergekit 0.1.5's
count, computed from Python's double product: `magnitude` keeps max(1, int(density * n)),
`magnitude_outliers` int(density * n) after dropping int(gamma * n). A traced density (the
search's, a jit argument learnt per layer) becomes k = round(density * n), half up, in float32:
float32 cannot reproduce the double product anyway (0.33f * 20 is not 0.33 * 20), and rounding
to the nearest count, with no floor of one entry, keeps k unbiased and continuous in the
density, which the search moves in small steps.
"""

from __future__ import annotations

import math
import operator
from typing import Callable, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_SIGN_OFF = 0x7FFFFFFF
_INF_BITS = 0x7F800000
_LO_BITS = 16  # global counts are carried as hi * 2**16 + lo in int32 (no x64 needed)
_LO_MASK = (1 << _LO_BITS) - 1
_WAYS = 5  # a pass counts _WAYS - 1 thresholds
_GUIDED_PASSES = 2  # passes that take their thresholds from the sample
_SAMPLE = 4096  # entries in the sample
_ROW = 1024  # widest row of the [rows, row] view the tie-break counts

# An array, or a pair (model, base) standing for float32(model) - float32(base).
TaskVector = Union[jax.Array, tuple]


def abs_bits(x: jax.Array) -> jax.Array:
    """|x| as float32 bits in uint32; integer order == magnitude order (NaN sorts above inf)."""
    bits = lax.bitcast_convert_type(jnp.asarray(x).astype(jnp.float32), jnp.uint32)
    return bits & jnp.uint32(_SIGN_OFF)


def _bits_to_float(bits: jax.Array) -> jax.Array:
    return lax.bitcast_convert_type(bits, jnp.float32)


def value(tv: TaskVector) -> jax.Array:
    """The task vector as an array (float32 for a pair)."""
    if isinstance(tv, tuple):
        model, base = tv
        return jnp.asarray(model).astype(jnp.float32) - jnp.asarray(base).astype(jnp.float32)
    return jnp.asarray(tv)


def _shape(tv: TaskVector) -> tuple[int, ...]:
    return jnp.shape(tv[0] if isinstance(tv, tuple) else tv)


def _keys(tv: TaskVector) -> jax.Array:
    """The magnitude keys in the tensor's own shape.

    Never reshaped to 1-D on the way to an elementwise result: inside a fusion XLA:CPU turns a
    reshape into a div/mod per entry (the keep mask of a 576x1536 tensor took 8x as long).
    """
    return abs_bits(value(tv))


def _flat_index(shape: tuple[int, ...]) -> jax.Array:
    """The row-major flat index of every entry, built in `shape` from iotas (no reshape)."""
    idx, stride = jnp.zeros(shape, jnp.int32), 1
    for d in reversed(range(len(shape))):
        idx = idx + lax.broadcasted_iota(jnp.int32, shape, d) * stride
        stride *= shape[d]
    return idx


def reduce_each(terms: Sequence[jax.Array], init, op: Callable, axes: tuple[int, ...]) -> list[jax.Array]:
    """Each term reduced over `axes` by `op` (identity `init`), all in one variadic reduce.

    XLA:CPU vectorizes a reduce of two or more operands but emits a scalar loop for a single
    integer or boolean one, 10-15x slower (measured on 28M-entry tensors); a lone term gets a
    partner filled with `init`.
    """
    terms = list(terms)
    padded = terms + [jnp.full_like(terms[0], init)] * (len(terms) < 2)
    out = lax.reduce(tuple(padded), tuple(jnp.asarray(init, t.dtype) for t in padded),
                     lambda a, b: tuple(op(x, y) for x, y in zip(a, b)), axes)
    return list(out[:len(terms)])


def _sum_each(terms: Sequence[jax.Array], axes: tuple[int, ...]) -> list[jax.Array]:
    """Each int32 term summed over `axes`, in one read."""
    return reduce_each(terms, 0, operator.add, axes)


def _count_ge(u: jax.Array, ts: jax.Array) -> jax.Array:
    """[#{u >= ts[i]}] as int32, for any-shaped u and a short vector ts, in one read of u."""
    return jnp.stack(_sum_each([(u >= ts[i]).astype(jnp.int32) for i in range(ts.shape[0])],
                               tuple(range(u.ndim))))


def _even_splits(lo: jax.Array, hi: jax.Array) -> jax.Array:
    """_WAYS - 1 thresholds splitting [lo, hi) into _WAYS near-equal parts, clipped below hi."""
    w = hi - lo
    q, r = w // _WAYS, w % _WAYS
    i = jnp.arange(1, _WAYS, dtype=jnp.uint32)
    return jnp.minimum(lo + i * q + jnp.minimum(i, r), hi - 1)


def _start(top_count, none_count):
    """The search state (lo, hi, count(lo), count(hi), pass) before any pass."""
    return (jnp.uint32(0), jnp.uint32(_INF_BITS + 1), top_count, none_count, jnp.int32(0))


def _thresholds(propose: Callable, state) -> jax.Array:
    lo, hi, c_lo, c_hi, i = state
    return jnp.clip(propose(lo, hi, c_lo, c_hi, i), lo, hi - 1)


def _narrow(state, ts: jax.Array, c, enough: Callable):
    """The state after a pass that counted c at the thresholds ts."""
    lo, hi, c_lo, c_hi, i = state
    n_ok = jnp.sum(enough(c).astype(jnp.int32))  # a prefix of the ascending ts
    below, above = jnp.maximum(n_ok - 1, 0), jnp.minimum(n_ok, _WAYS - 2)
    raise_lo, lower_hi = n_ok > 0, n_ok < _WAYS - 1
    pick = lambda flag, at, old: jax.tree.map(  # noqa: E731
        lambda x, y: jnp.where(flag, x[at], y), c, old)
    return (jnp.where(raise_lo, ts[below], lo), jnp.where(lower_hi, ts[above], hi),
            pick(raise_lo, below, c_lo), pick(lower_hi, above, c_hi), i + 1)


def _search(count: Callable, enough: Callable, propose: Callable, state):
    """(T, count(T)): T the largest bit pattern in [0, +inf] with enough(count(T)).

    count(ts, i) -> counts (a pytree of arrays with a leading axis over ts) in pass i, monotone
    non-increasing in t; enough(counts) -> bool per threshold. `state` is `_start(count(0),
    count(+inf + 1))` (enough must hold for the first; the second is never counted) or the
    state after passes made elsewhere. propose(lo, hi, c_lo, c_hi, i) -> _WAYS - 1 ascending
    thresholds for pass i (any values; they are clipped into [lo, hi)). Invariant: enough at
    lo, not at hi.
    """
    def narrow(state):
        ts = _thresholds(propose, state)
        return _narrow(state, ts, count(ts, state[4]), enough)

    lo, _, c_lo, _, _ = lax.while_loop(lambda s: s[1] - s[0] > 1, narrow, state)
    return lo, c_lo


def _sample_stride(n: int) -> int:
    """About n / _SAMPLE, at least 2 (a sample, never the whole tensor) and coprime to n, so the
    sample visits every column of any [rows, columns] view of the tensor evenly."""
    s = max(n // _SAMPLE, 2)
    while s > 2 and math.gcd(s, n) != 1:
        s -= 1
    return s


def _guided(sample: jax.Array, k: jax.Array):
    """A `propose` for _search from a sorted sample of the keys.

    The first _GUIDED_PASSES passes guess T among the sample values inside [lo, hi), placing k
    by interpolation between the exact counts at lo and hi, and count at the guess v, at v + 1
    and at 2 sqrt(#inside) sample positions either side. Later passes, and any pass with no
    sample value inside [lo, hi), split it evenly.
    """
    m = sample.shape[0]

    def propose(lo, hi, c_lo, c_hi, i):
        first, last = jnp.searchsorted(sample, jnp.stack([lo, hi]), side="left",
                                       method="compare_all")
        inside = last - first
        frac = (c_lo - k).astype(jnp.float32) / jnp.maximum(c_lo - c_hi, 1).astype(jnp.float32)
        p = first + jnp.floor(frac * inside.astype(jnp.float32)).astype(jnp.int32)
        e = jnp.ceil(2 * jnp.sqrt(inside.astype(jnp.float32))).astype(jnp.int32) + 1
        at = lambda j: sample[jnp.clip(j, 0, m - 1)]  # noqa: E731
        v = at(p)
        guess = jnp.stack([at(p - e), v, v + 1, at(p + e) + 1])
        return jnp.where((i < _GUIDED_PASSES) & (inside > 0), guess, _even_splits(lo, hi))

    return propose


def _sample(tv: TaskVector) -> jax.Array:
    """A sorted strided sample of the keys."""
    n = int(np.prod(_shape(tv)))
    # Behind a barrier, XLA cannot merge these keys with the caller's use of the same values
    # into one stored array: the strided slice computes only the sampled entries.
    return jnp.sort(_keys(lax.optimization_barrier(tv)).reshape(-1)[::_sample_stride(n)])


def _counter(tv: TaskVector) -> Callable:
    def count(ts, i):
        # Tied to the pass index, so XLA cannot hoist the keys out of the loop as one stored
        # array; they are recomputed from the inputs by each pass.
        inputs, _ = lax.optimization_barrier((tv, i))
        return _count_ge(_keys(inputs), ts)
    return count


def _kth_bits(tv: TaskVector, k: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(T, #{keys >= T}) for k in [1, n]."""
    n = int(np.prod(_shape(tv)))
    return _search(_counter(tv), lambda c: c >= k, _guided(_sample(tv), k), _start(jnp.int32(n), jnp.int32(0)))


def _row_width(shape: tuple[int, ...]) -> int:
    """The width of the [n / width, width] view of a tensor: its own rows when it is 2-D (no
    reshape, see _keys), else the largest divisor of n up to _ROW."""
    if len(shape) == 2:
        return shape[1]
    n = int(np.prod(shape))
    return next(c for c in range(min(n, _ROW), 0, -1) if n % c == 0)


def _rows(keys: jax.Array) -> jax.Array:
    """The [n / width, width] view of the keys (see _row_width)."""
    width = _row_width(keys.shape)
    return keys.reshape(keys.size // width, width)


def _tie_cut(tv: TaskVector, t: jax.Array, k: jax.Array) -> jax.Array:
    """Flat index c such that the keys > t plus the keys == t below index c are k entries.

    One read counts ties and larger entries per row of the `_rows` view."""
    rows = _rows(_keys(tv))
    ties_per_row, above_per_row = _sum_each(
        [(rows == t).astype(jnp.int32), (rows > t).astype(jnp.int32)], (1,))
    return _cut_from_rows(tv, t, k, ties_per_row, above_per_row)


def _cut_from_rows(tv: TaskVector, t, k, ties_per_row: jax.Array, above_per_row: jax.Array) -> jax.Array:
    """_tie_cut's c from the per-row counts of keys == t and > t: the flat index of the first tie
    that no longer fits (n if all fit), located by running sums over the per-row counts and then
    over the one row that holds it (no cumulative sum over the tensor, no loop)."""
    n = int(np.prod(_shape(tv)))
    width = _row_width(_shape(tv))
    room = k - jnp.sum(above_per_row)  # how many tied entries still fit
    through = jnp.cumsum(ties_per_row)  # ties in rows 0..r
    r = jnp.sum((through <= room).astype(jnp.int32))  # the row holding tie number room + 1
    before = jnp.where(r > 0, through[jnp.maximum(r - 1, 0)], 0)
    inputs, _ = lax.optimization_barrier((tv, r))  # read one row, not the whole tensor
    row = lax.dynamic_index_in_dim(_rows(_keys(inputs)), jnp.minimum(r, n // width - 1), 0, keepdims=False)
    col = jnp.sum((jnp.cumsum((row == t).astype(jnp.int32)) <= room - before).astype(jnp.int32))
    return jnp.where(r < n // width, r * width + col, n)


def _topk_cuts(tvs: Sequence[TaskVector], ks: Sequence) -> list[tuple[jax.Array, jax.Array]]:
    """(t, cut) of each of several same-shaped task vectors: the k largest keys are those > t
    and those == t at flat index < cut.

    The first pass of every search is made in one read of all the task vectors (a base they
    share as pairs is read once), counting per row of the `_rows` view, so that when the
    sample's guess v is the k-th key (the usual case for deltas of bf16 weights) the ties at v
    are cut from its counts at v and v + 1 without a pass of their own.
    """
    n = int(np.prod(_shape(tvs[0])))
    ks = [jnp.clip(jnp.asarray(k, jnp.int32), 0, n) for k in ks]
    proposes = [_guided(_sample(tv), jnp.maximum(k, 1)) for tv, k in zip(tvs, ks)]
    start = _start(jnp.int32(n), jnp.int32(0))
    tss = [_thresholds(p, start) for p in proposes]
    inputs = lax.optimization_barrier(list(tvs))  # keys recomputed here, not stored for later
    per_row = _sum_each([(_rows(_keys(tv)) >= ts[j]).astype(jnp.int32)
                         for tv, ts in zip(inputs, tss) for j in range(_WAYS - 1)], (1,))
    out = []
    for i, (tv, k, ts, propose) in enumerate(zip(tvs, ks, tss, proposes)):
        rows_ge = per_row[i * (_WAYS - 1):(i + 1) * (_WAYS - 1)]
        enough = lambda c, k=k: c >= jnp.maximum(k, 1)  # noqa: E731
        state = _narrow(start, ts, jnp.stack([jnp.sum(r) for r in rows_ge]), enough)
        t, n_ge = _search(_counter(tv), enough, propose, state)
        counted = (t == ts[1]) & (ts[2] == ts[1] + 1)  # the pass counted t and t + 1 per row

        def cut(tv=tv, t=t, k=k, rows_ge=rows_ge, counted=counted):
            return lax.cond(counted, lambda: _cut_from_rows(tv, t, k, rows_ge[1] - rows_ge[2], rows_ge[2]),
                            lambda: _tie_cut(tv, t, k))
        # when every entry >= t fits, no tie needs breaking
        out.append((t, lax.cond(n_ge == k, lambda: jnp.int32(n), cut)))
    return out


def _topk_cut(tv: TaskVector, k: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(t, cut): the k largest keys are those > t and those == t at flat index < cut."""
    return _topk_cuts([tv], [k])[0]


def _keep(tv: TaskVector, t: jax.Array, cut: jax.Array) -> jax.Array:
    u = _keys(tv)
    return (u > t) | ((u == t) & (_flat_index(u.shape) < cut))


def known(x) -> bool:
    """Whether x is a number on the host (not a traced or device value)."""
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def mergekit_k(density: float, n: int) -> int:
    """mergekit 0.1.5's `magnitude` count: max(1, int(density * n)) in double precision; n when
    density >= 1, 0 when density <= 0 or the tensor is empty."""
    if density >= 1:
        return n
    if density <= 0 or n == 0:
        return 0
    return min(max(1, int(density * n)), n)


def mergekit_count(frac: float, n: int) -> int:
    """int(frac * n) in double precision, clipped to [0, n]: mergekit 0.1.5's `magnitude_outliers`
    counts (kept and dropped outliers alike; no floor of one entry)."""
    return min(max(int(frac * n), 0), n)


def density_to_k(density, n: int) -> jax.Array:
    """Number of entries a traced density keeps out of n: round(density * n) in float32, clipped
    to [0, n] (see the module's Rounding)."""
    k = jnp.floor(jnp.asarray(density, jnp.float32) * jnp.float32(n) + 0.5)
    return jnp.clip(k, 0, n).astype(jnp.int32)


@jax.jit
def kth_largest_abs(x: jax.Array, k) -> jax.Array:
    """Exact k-th largest |x| (float32), k counted from 1 and clipped to [1, x.size].

    Counts are int32, so x must have fewer than 2**31 elements (true of every HF tensor).
    """
    k = jnp.clip(jnp.asarray(k, jnp.int32), 1, jnp.size(x))
    return _bits_to_float(_kth_bits(x, k)[0])


def _topk_mask_k(tv: TaskVector, k) -> jax.Array:
    if int(np.prod(_shape(tv))) == 0:
        return jnp.zeros(_shape(tv), bool)
    return _keep(tv, *_topk_cut(tv, k))


@jax.jit
def topk_mask_k(x: TaskVector, k) -> jax.Array:
    """Boolean mask of exactly k entries of largest |x| (mergekit's per-tensor scope).

    Ties at the threshold go to the lowest flat indices, so exactly k survive and the masks for
    growing k are nested (the order is |x| descending, then flat index ascending).
    """
    return _topk_mask_k(x, k)


def topk_mask(x: TaskVector, density) -> jax.Array:
    """Mask keeping the density's count of entries of largest magnitude: mergekit's
    max(1, int(density * n)) for a known density, round(density * n) for a traced one."""
    n = int(np.prod(_shape(x)))
    return _topk_mask_k(x, mergekit_k(density, n) if known(density) else density_to_k(density, n))


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
    def count(ts, _):
        hi = lo = jnp.zeros(ts.shape, jnp.int32)
        for u in us:
            c_hi, c_lo = _split_count(_count_ge(u, ts))
            hi, lo = hi + c_hi, lo + c_lo
        return hi, lo

    zero = jnp.zeros((), jnp.int32)  # the counts at the ends are not needed here
    return _search(count, lambda c: _pair_ge(c[0], c[1], k_hi, k_lo),
                   lambda lo, hi, *_: _even_splits(lo, hi), _start((zero, zero), (zero, zero)))[0]


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

def rescale_masked(tv, keep, rescale) -> jax.Array:
    """tv * keep; with `rescale`, scaled so its L1 norm equals tv's (mergekit RescaleNorm.l1).

    As in mergekit, no scaling when either norm is below 1e-7. tv and keep may be zero-argument
    functions giving the arrays: the norms (two more reads, skipped when `rescale` is off) then
    recompute them instead of needing them stored.
    """
    get = lambda x: x() if callable(x) else x  # noqa: E731

    def factor():
        t = get(tv)
        before = jnp.sum(jnp.abs(t))
        after = jnp.sum(jnp.abs(jnp.where(get(keep), t, 0.0)))
        ok = (before >= 1e-7) & (after >= 1e-7)
        return jnp.where(ok, before / jnp.where(ok, after, 1.0), 1.0)

    scale = lax.cond(jnp.asarray(rescale, bool), factor, lambda: jnp.float32(1.0))
    return jnp.where(get(keep), get(tv), 0.0) * scale


def magnitude(tv: TaskVector, density, rescale=False) -> jax.Array:
    """Keep the density's count of largest-|tv| entries (TIES trim, per tensor): mergekit's for
    a known density, see the module's Rounding."""
    return magnitudes([tv], [density], rescale)[0]


def magnitudes(tvs: Sequence[TaskVector], densities: Sequence, rescale=False,
               ks: Sequence | None = None) -> list[jax.Array]:
    """`magnitude` of several same-shaped task vectors, their searches' first passes shared.

    ks: the counts kept, when the host computed them (mergekit_k of the planned densities);
    densities still decide whether a task vector is kept whole (density >= 1)."""
    n = int(np.prod(_shape(tvs[0])))
    if n == 0:
        return [value(tv) for tv in tvs]
    if ks is None:
        ks = [mergekit_k(d, n) if known(d) else density_to_k(d, n) for d in densities]
    cuts = _topk_cuts(tvs, list(ks))
    return [jnp.where(jnp.asarray(d) >= 1, value(tv),
                      rescale_masked(lambda tv=tv: value(tv), lambda tv=tv, tc=tc: _keep(tv, *tc), rescale))
            for tv, d, tc in zip(tvs, densities, cuts)]


def bernoulli(tv: jax.Array, density, key: jax.Array, rescale=True) -> jax.Array:
    """DARE: keep each entry with probability `density`; rescale matches the L1 norm before the
    drop (mergekit), not the paper's 1/density."""
    keep = jax.random.bernoulli(key, jnp.asarray(density, jnp.float32), jnp.shape(tv))
    out = rescale_masked(tv, keep, rescale)
    return jnp.where(jnp.asarray(density) >= 1, tv, out)


def magnitude_outliers(tv: jax.Array, density, gamma, rescale=False, counts=None) -> jax.Array:
    """Model Breadcrumbs: drop the top `gamma` fraction by |tv|, keep the next `density` fraction.

    If gamma + density > 1 fewer outliers are dropped so that the density is still met.
    counts: (kept, dropped) when the host computed them (mergekit_count of the planned density
    and gamma); else mergekit's counts for known values, round(x * n) for traced ones.
    """
    n = int(np.prod(jnp.shape(tv)))
    if counts is None:
        counts = [mergekit_count(x, n) if known(density) and known(gamma) else density_to_k(x, n)
                  for x in (density, gamma)]
    n_keep, n_drop = counts
    n_top = jnp.minimum(n_drop, n - n_keep)
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
