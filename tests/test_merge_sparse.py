"""Sparsifying / task-arithmetic merge methods against hand-derived values and numpy oracles.

The oracles are direct transcriptions of the published formulas (mergekit's GTA pipeline,
sort-based top-k) with mergekit 0.1.5's counts for planned densities (np_k, np_count; the
engine hands them in through a method's `host_params`, as `call` does) and jmerge's own float32
rounding for traced ones (np_round_k, the search's path). Random methods draw their masks with the documented key contract: model i
uses jax.random.bernoulli(fold_in(key, i), p, shape); everything after the draw is numpy.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmerge.errors import JmergeError
from jmerge.merge import METHODS, get
from jmerge.merge import _sparsify as sp

RNG = np.random.default_rng(0)
SHAPE = (4, 5)
KEY = jax.random.key(42)


# ---- numpy oracles --------------------------------------------------------------------------

def np_k(density, n):
    """mergekit's `magnitude`: all if density >= 1, none if <= 0, else max(1, int(density * n))."""
    if density >= 1:
        return n
    return 0 if density <= 0 else max(1, int(density * n))


def np_count(frac, n):
    """mergekit's `magnitude_outliers` counts: int(frac * n), no floor of one."""
    return min(max(int(frac * n), 0), n)


def np_round_k(density, n):
    """A traced density's count: round(density * n), half up, in float32."""
    return int(min(max(np.floor(np.float32(density) * np.float32(n) + np.float32(0.5)), 0), n))


def np_sce_k(select_topk, nonzero):
    """mergekit's SCE count: int(nonzero * select_topk), a float32 product (torch tensor * float)."""
    return int(np.float32(nonzero) * np.float32(select_topk))


def np_topk_mask(x, k):
    order = np.argsort(-np.abs(x).ravel(), kind="stable")  # |x| descending, then index
    mask = np.zeros(x.size, bool)
    mask[order[:k]] = True
    return mask.reshape(x.shape)


def np_rescale(tv, mask, rescale):
    out = tv * mask
    before, after = np.abs(tv).sum(), np.abs(out).sum()
    if rescale and before >= 1e-7 and after >= 1e-7:
        out = out * (before / after)
    return out


def np_magnitude(tv, density, rescale=False):
    if density >= 1:
        return tv
    return np_rescale(tv, np_topk_mask(tv, np_k(density, tv.size)), rescale)


def np_outliers(tv, density, gamma, rescale=False):
    if density >= 1:
        return tv
    n = tv.size
    n_keep = np_count(density, n)
    n_top = min(np_count(gamma, n), n - n_keep)
    order = np.argsort(-np.abs(tv).ravel(), kind="stable")
    mask = np.zeros(n, bool)
    mask[order[n_top:n_top + n_keep]] = True
    return np_rescale(tv, mask.reshape(tv.shape), rescale)


def np_della_prob(tv, density, eps):
    rows = np.abs(tv).reshape(-1, tv.shape[-1])
    rank = np.argsort(np.argsort(rows, axis=-1, kind="stable"), axis=-1, kind="stable")
    return (density - eps + rank / (rows.shape[-1] - 1) * 2 * eps).reshape(tv.shape)


def np_combine(tvs, weights, consensus, normalize, lam=1.0):
    w = np.asarray(weights, np.float64).reshape(-1, *([1] * tvs[0].ndim))
    d = np.stack(tvs).astype(np.float64)
    wd = d * w
    if consensus:
        majority = np.where(wd.sum(0) >= 0, 1.0, -1.0)
        m = np.sign(wd) == majority
        mixed = (wd * m).sum(0)
        div = (w * m).sum(0)
        div[div == 0] = 1
    else:
        mixed = wd.sum(0)
        div = np.broadcast_to(w.sum(0), mixed.shape).copy()
        div[np.abs(div) < 1e-8] = 1
    if normalize:
        mixed = mixed / div
    return mixed * lam


def jax_mask(key, i, p, shape):
    return np.asarray(jax.random.bernoulli(jax.random.fold_in(key, i), jnp.asarray(p, jnp.float32),
                                           shape))


def rand(*shape, scale=1.0):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def tvs_of(base, models):
    return [np.asarray(m, np.float64) - np.asarray(base, np.float64) for m in models]


def close(a, b, tol=1e-5):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=tol,
                               atol=tol)


# ---- shared jitted callables (one compile per method and shape) ---------------------------

@functools.lru_cache(maxsize=None)
def jitted(name):
    fn = METHODS[name].fn
    return jax.jit(lambda base, models, key, params: fn(base, models, key=key, **params))


def call(name, base, models, key=None, planned=True, **params):
    """Call through jit with every parameter traced (lists become one traced scalar per model).

    Unset parameters are filled from the registry so each method compiles once per shape. As
    the engine does for a merge YAML (`planned`), a method's `host_params` first computes its
    exact counts from the Python values; planned=False is the search's path (traced values only)."""
    m = get(name)
    filled = {k: [v] * len(models) for k, v in m.model_params.items() if v is not None}
    params = {**filled, **m.global_params, **params}
    host = m.host_params
    if planned and host is not None:
        params.update(host(params, int(np.size(base))))
    traced = {k: ([jnp.asarray(x) for x in v] if isinstance(v, (list, tuple)) else jnp.asarray(v))
              for k, v in params.items()}
    return jitted(name)(jnp.asarray(base), [jnp.asarray(m) for m in models], key, traced)


@functools.lru_cache(maxsize=None)
def _kth_jit():
    return jax.jit(sp.kth_largest_abs)


@functools.lru_cache(maxsize=None)
def _topk_jit():
    return jax.jit(sp.topk_mask_k)


# ---- exact k-th magnitude and top-k -------------------------------------------------------

def _check_kth(x):
    mags = np.sort(np.abs(x.astype(np.float32)).ravel())[::-1]
    for k in range(1, x.size + 1):
        got = np.asarray(_kth_jit()(jnp.asarray(x), jnp.int32(k)))
        assert got == mags[k - 1], (k, got, mags[k - 1])
        mask = np.asarray(_topk_jit()(jnp.asarray(x), jnp.int32(k)))
        assert mask.sum() == k
        np.testing.assert_array_equal(mask, np_topk_mask(x, k))


def test_kth_exact_random_with_ties_and_signed_zeros():
    x = rand(20)
    x[[3, 7, 11]] = 0.75          # a three-way tie
    x[5] = -0.75                  # tie across signs
    x[[0, 9]] = [0.0, -0.0]       # signed zeros are equal magnitudes
    x[13] = 1e-42                 # subnormal stays above zero
    _check_kth(x)


def test_kth_all_equal_and_extremes():
    _check_kth(np.full(20, -2.5, np.float32))
    x = np.zeros(20, np.float32)
    x[4], x[8], x[15] = np.inf, -np.finfo(np.float32).max, np.finfo(np.float32).tiny
    _check_kth(x)
    z = np.array([-0.0] * 10 + [0.0] * 10, np.float32)
    _check_kth(z)
    assert np.asarray(_kth_jit()(jnp.asarray(z), jnp.int32(1))) == 0.0


def test_kth_clips_k_and_bf16_input():
    x = rand(20)
    assert float(sp.kth_largest_abs(x, 0)) == np.abs(x).max()
    assert float(sp.kth_largest_abs(x, 99)) == np.abs(x).min()
    xb = jnp.asarray(x, jnp.bfloat16)
    ref = np.sort(np.abs(np.asarray(xb, np.float32)))[::-1]
    assert float(sp.kth_largest_abs(xb, 5)) == ref[4]


def test_topk_mask_density_rounding_full_and_tiny():
    x = rand(*SHAPE)
    # (density, mergekit's count for a known density, round half up for a traced one), n = 20
    for density, k, k_traced in [(1.0, 20, 20), (0.5, 10, 10), (0.33, 6, 7), (0.02, 1, 0),
                                 (0.03, 1, 1), (0.0, 0, 0)]:
        assert (np_k(density, 20), np_round_k(density, 20)) == (k, k_traced)
        mask = np.asarray(sp.topk_mask(jnp.asarray(x), density))
        assert mask.sum() == k, density
        np.testing.assert_array_equal(mask, np_topk_mask(x, k))
        traced = np.asarray(jax.jit(sp.topk_mask)(jnp.asarray(x), jnp.float32(density)))
        np.testing.assert_array_equal(traced, np_topk_mask(x, k_traced))
    tie = np.array([1.0, -1.0, 1.0, 0.5, -1.0], np.float32)
    np.testing.assert_array_equal(np.asarray(sp.topk_mask_k(tie, 2)),
                                  [True, True, False, False, False])


def _distinct(shape, seed=0):
    """Entries of distinct magnitudes 1..n with random signs (no ties at any count)."""
    r = np.random.default_rng(seed)
    n = int(np.prod(shape))
    return (r.permutation(n) + 1.0).astype(np.float32).reshape(shape) * r.choice([-1, 1], shape)


def test_planned_counts_are_mergekits_and_traced_ones_round():
    """A YAML's densities keep mergekit's int() counts (the engine computes them on the host);
    the search's traced densities round half up in float32. n = 20: density 0.33 keeps 6
    (traced: 7), 0.02 keeps 1 (traced: 0); breadcrumbs' gamma 0.08 drops int(1.6) = 1 (traced: 2)."""
    base, tv = np.zeros(SHAPE, np.float32), _distinct(SHAPE)
    for planned, k33, k02, drop in ((True, 6, 1, 1), (False, 7, 0, 2)):
        for density, k in ((0.33, k33), (0.02, k02)):
            got = call("ties", base, [tv], weight=[0.5], density=[density], planned=planned)
            np.testing.assert_array_equal(np.asarray(got), np.where(np_topk_mask(tv, k), tv, 0))
        got = call("breadcrumbs", base, [tv], weight=[1.0], density=[0.33], gamma=[0.08],
                   planned=planned)
        band = np_topk_mask(tv, drop + k33) & ~np_topk_mask(tv, drop)
        np.testing.assert_array_equal(np.asarray(got), np.where(band, tv, 0))


def test_engine_adds_mergekits_counts_to_a_planned_job():
    """engine.prepare's host step: a ties job gets its per-model counts as int32, which
    job_params passes on untouched (float32 would round counts above 2**24)."""
    from jmerge.engine.jobs import TensorJob
    from jmerge.engine.prepare import job_params, with_host_params
    job = TensorJob("model.norm.weight", None, 0, "b", ("m1", "m2"), ("n", "n", "n"),
              {"weight": (1.0, 1.0), "density": (0.33, 0.02), "normalize": True})
    dyn, _ = job_params(with_host_params(get("ties"), job, (WIDE,)), frozenset(), None)
    assert [int(k) for k in dyn["density_k"]] == [int(0.33 * WIDE), int(0.02 * WIDE)]
    assert int(np.float32(int(0.33 * WIDE))) != int(0.33 * WIDE)
    assert all(k.dtype == np.int32 for k in dyn["density_k"]) and dyn["density"][0].dtype == np.float32
    dyn, _ = job_params(with_host_params(get("breadcrumbs"), dataclasses.replace(
        job, params={**job.params, "gamma": (0.08, 0.3)}), (20,)), frozenset(), None)
    assert [int(k) for k in dyn["density_k"] + dyn["gamma_k"]] == [6, 0, 1, 6]
    assert with_host_params(get("task_arithmetic"), job, (20,)) is job


WIDE = 2**26 + 1  # int(0.33 * WIDE) is odd, above 2**24: no float32 holds it


def test_global_threshold_across_arrays():
    xs = [rand(3, 4), rand(7), rand(2, 2, 2)]
    xs[1][2] = xs[0][1, 1]  # a tie across arrays
    allmag = np.sort(np.abs(np.concatenate([x.ravel() for x in xs])))[::-1]
    n = allmag.size
    for k in [1, 2, 5, 13, 26, n]:
        assert float(sp.global_kth_largest_abs(xs, k)) == allmag[k - 1]
        assert float(sp.global_kth_largest_abs(xs, jnp.int32(k))) == allmag[k - 1]
    traced = jax.jit(lambda d: sp.global_topk_threshold(xs, d))
    for density in [0.1, 0.5, 1.0]:
        k = max(np_round_k(density, n), 1)
        thr = float(sp.global_topk_threshold(xs, density))
        assert thr == allmag[k - 1]
        assert sum(int((np.abs(x) >= thr).sum()) for x in xs) == k  # no ties at these k
        assert float(traced(jnp.float32(density))) == allmag[k - 1]


def test_global_count_pair_handles_counts_beyond_int32():
    # totals far above 2**31 as hi * 2**16 + lo, with lo not yet carried (as after summing leaves)
    for total, k in [(3 * 2**31 + 5, 3 * 2**31 + 5), (3 * 2**31 + 4, 3 * 2**31 + 5),
                     (2**33, 2**32 + 70000), (70000, 65537), (65536, 65537)]:
        hi, lo = (total >> 16) - 1, (total & 0xFFFF) + 0x10000
        got = sp._pair_ge(jnp.int32(hi), jnp.int32(lo), jnp.int32(k >> 16), jnp.int32(k & 0xFFFF))
        assert bool(got) == (total >= k), (total, k)


# ---- the multi-way search equals plain bisection ------------------------------------------

def bisect_kth_bits(x, k):
    """The previous selection, kept as the reference: 32 bisection steps on the |x| bit patterns
    over [0, +inf], each counting #{bits >= t} over the whole array."""
    u = np.abs(x.astype(np.float32)).view(np.uint32).ravel()
    lo, hi = 0, 0x7F800000 + 1
    for _ in range(32):
        mid = lo + (hi - lo) // 2
        if int((u >= mid).sum()) >= k:
            lo = mid
        else:
            hi = mid
    return lo


def bisect_topk_mask(x, k):
    """Reference mask: above the k-th largest, then ties by a cumulative count (lowest index)."""
    u = np.abs(x.astype(np.float32)).view(np.uint32).ravel()
    t = bisect_kth_bits(x, max(k, 1))
    above, tie = u > t, u == t
    keep = above | (tie & (np.cumsum(tie) <= k - above.sum()))
    return keep.reshape(x.shape)


def _search_cases(shape):
    n = int(np.prod(shape))
    r = np.random.default_rng(n)
    g = r.standard_normal(n).astype(np.float32)
    b = r.standard_normal(n).astype(np.float32)
    bf16 = lambda a: np.asarray(jnp.asarray(a, jnp.bfloat16), np.float32)  # noqa: E731
    misleading = g.copy()
    misleading[::sp._sample_stride(n)] = 5.0  # the strided sample sees only 5.0
    extremes = np.where(r.random(n) < 0.2, np.float32(np.inf), g)
    extremes[r.random(n) < 0.2] = -np.finfo(np.float32).max
    extremes[r.random(n) < 0.2] = -np.inf
    denormal = np.where(r.random(n) < 0.5, g * np.float32(1e-40), np.float32(0.0))
    denormal[r.random(n) < 0.3] = -0.0
    cases = {
        "gaussian": g,
        "tie-heavy": np.round(g * 3),
        "bf16 deltas": bf16(b + 0.05 * g) - bf16(b),
        "all equal": np.full(n, -2.5, np.float32),
        "zeros": np.where(r.random(n) < 0.5, np.float32(0.0), np.float32(-0.0)),
        "denormal": denormal,
        "inf and max": extremes,
        "misleading sample": misleading,
    }
    return {name: x.reshape(shape).astype(np.float32) for name, x in cases.items()}


@pytest.mark.parametrize("shape", [(1,), (7,), (3, 17), (37, 541)])
def test_search_equals_bisection(shape):
    n = int(np.prod(shape))
    r = np.random.default_rng(7)
    for name, x in _search_cases(shape).items():
        ks = sorted({0, 1, min(2, n), n // 3, n // 2, n - 1, n, *r.integers(0, n + 1, 3).tolist()})
        for k in ks:
            mask = np.asarray(_topk_jit()(jnp.asarray(x), jnp.int32(k)))
            np.testing.assert_array_equal(mask, bisect_topk_mask(x, k), err_msg=f"{name} k={k}")
            if k >= 1:
                got = np.asarray(_kth_jit()(jnp.asarray(x), jnp.int32(k)))
                assert got.view(np.uint32) == bisect_kth_bits(x, k), (name, k)


@pytest.mark.parametrize("shape", [(7,), (37, 541)])
def test_joint_trim_of_several_task_vectors_equals_each_alone(shape):
    """`magnitudes` shares the first counting pass of several task vectors (and cuts the ties at
    a right guess from that pass): every case of _search_cases, three at a time as
    (model, base) pairs with one base and different densities, against bisection. The bf16
    deltas take the shortcut (the sample's guess is the k-th key with ties at it); the
    misleading sample and gaussian cases do not."""
    n = int(np.prod(shape))
    cases = _search_cases(shape)
    base = np.zeros(shape, np.float32)
    as_pairs = jax.jit(lambda ms, b, ds: sp.magnitudes([(m, b) for m in ms], ds))
    as_arrays = jax.jit(lambda ms, b, ds: sp.magnitudes(ms, ds))
    names = list(cases)
    for j in range(len(names)):
        trio = [names[j], names[(j + 1) % len(names)], names[(j + 3) % len(names)]]
        ds = [0.3, 0.5, 0.9]
        # a pair's difference flushes denormals to zero on XLA:CPU, as any float32 subtraction there
        joint = as_arrays if "denormal" in trio else as_pairs
        got = joint([jnp.asarray(cases[c]) for c in trio], jnp.asarray(base), [jnp.float32(d) for d in ds])
        for c, d, g in zip(trio, ds, got):
            want = np.where(bisect_topk_mask(cases[c], np_round_k(d, n)), cases[c], 0)
            np.testing.assert_array_equal(np.asarray(g), want, err_msg=f"{c} density {d}")

    def guessed(x, d):  # whether the first pass's guess is the k-th key, with ties at it
        k = jnp.int32(np_round_k(d, n))
        ts = sp._thresholds(sp._guided(sp._sample(jnp.asarray(x)), k), sp._start(jnp.int32(n), jnp.int32(0)))
        u = np.abs(x).view(np.uint32).ravel()
        t = bisect_kth_bits(x, int(k))
        return int(ts[1]) == t and (u == t).sum() > 1 and int(ts[2]) == t + 1
    if n > 1000:
        assert guessed(cases["bf16 deltas"], 0.3) and guessed(cases["tie-heavy"], 0.5)
        assert not guessed(cases["misleading sample"], 0.3) and not guessed(cases["gaussian"], 0.5)


def test_search_on_a_model_base_pair_equals_the_difference():
    r = np.random.default_rng(3)
    base = jnp.asarray(r.standard_normal((37, 541)), jnp.bfloat16)
    model = jnp.asarray(np.asarray(base, np.float32) + 0.05 * r.standard_normal((37, 541)),
                        jnp.bfloat16)
    delta = np.asarray(model, np.float32) - np.asarray(base, np.float32)
    pair = jax.jit(lambda m, b, k: sp.topk_mask_k((m, b), k))
    for k in (1, 5000, 10008, 20016):
        np.testing.assert_array_equal(np.asarray(pair(model, base, jnp.int32(k))),
                                      bisect_topk_mask(delta, k))
    got = np.asarray(sp.magnitude((model, base), 0.3, True))
    close(got, np_magnitude(delta, 0.3, True))


# ---- arcee_fusion's KL, evaluated without float32 cancellation ----------------------------

def np_kl_rows(theta, base, eps=1e-8):
    """mergekit's formula in float64: sum (p + eps) log((p + eps) / (q + eps)) per row."""
    def softmax(x):
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)
    p = softmax(np.asarray(theta, np.float64)) + eps
    q = softmax(np.asarray(base, np.float64)) + eps
    return (p * np.log(p / q)).sum(-1, keepdims=True)


def np_kl_rows_float32(theta, base, eps=np.float32(1e-8)):
    """The same formula evaluated plainly in float32 (as PyTorch and XLA both do)."""
    def softmax(x):
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)
    p, q = softmax(theta) + eps, softmax(base) + eps
    return (p * np.log(p / q)).sum(-1, keepdims=True)


def test_arcee_kl_closed_form():
    from jmerge.merge.arcee_fusion import kl_rows
    # softmax([ln 3, 0]) = [3/4, 1/4] against [1/2, 1/2]; no cancellation, float32 is exact enough
    eps = 1e-8
    want = sum((a + eps) * math.log((a + eps) / (0.5 + eps)) for a in (0.75, 0.25))
    got = float(kl_rows(jnp.array([math.log(3.0), 0.0]), jnp.zeros(2))[0])
    assert abs(got - want) <= 1e-6 * want
    # far apart (|log p/q| >= 1), an underflowing softmax entry, one-entry rows
    theta = np.array([[5.0, -5.0, 0.0], [0.0, -190.0, 3.0], [1.0, 1.0, 1.0]], np.float32)
    base = np.array([[0.0, 0.0, 0.0], [0.0, -200.0, 3.0], [1.0, 1.0, 1.0]], np.float32)
    np.testing.assert_allclose(np.asarray(kl_rows(theta, base)), np_kl_rows(theta, base),
                               rtol=1e-5, atol=1e-12)
    assert float(kl_rows(jnp.ones((1, 1)), jnp.zeros((1, 1)))[0, 0]) == 0.0


def test_arcee_kl_exact_where_plain_float32_cancels():
    """A fine-tune's rows give p ~ q: the terms of sum p log(p/q) cancel to ~1e-9 of their size,
    so plain float32 carries ~1e-2..10x relative error (and XLA and PyTorch round differently,
    which is what made jmerge and mergekit keep different entries at the outlier threshold)."""
    from jmerge.merge.arcee_fusion import kl_rows
    cols = np.arange(576, dtype=np.float32)
    base = (0.02 * np.sin(np.outer([1.0, 2.0, 3.0], cols) / 7)).astype(np.float32)
    theta = (base + 1e-4 * np.cos(np.outer([5.0, 1.0, 0.5], cols) / 3)).astype(np.float32)
    want = np_kl_rows(theta, base)
    rel = lambda got: np.max(np.abs(np.asarray(got, np.float64) - want) / want)  # noqa: E731
    assert rel(kl_rows(jnp.asarray(theta), jnp.asarray(base))) < 1e-5
    assert rel(np_kl_rows_float32(theta, base)) > 1e-2  # what the plain formula gives


# ---- sparsifiers on their own ---------------------------------------------------------------

def test_breadcrumbs_sparsifier():
    tv = np.array([5.0, -4.0, 3.0, -2.0, 1.0, 0.5, -0.25, 0.1, 0.05, 0.0], np.float32)
    # gamma 0.2 drops the two largest, density 0.4 keeps the next four
    got = np.asarray(sp.magnitude_outliers(tv, 0.4, 0.2))
    close(got, [0, 0, 3.0, -2.0, 1.0, 0.5, 0, 0, 0, 0])
    # gamma + density > 1: fewer outliers dropped so 9 entries stay
    got = np.asarray(sp.magnitude_outliers(tv, 0.9, 0.5))
    close(got, [0, -4.0, 3.0, -2.0, 1.0, 0.5, -0.25, 0.1, 0.05, 0.0])
    close(sp.magnitude_outliers(tv, 1.0, 0.2), tv)
    x = rand(*SHAPE)
    close(sp.magnitude_outliers(x, 0.3, 0.1, True), np_outliers(x, 0.3, 0.1, True))


def test_della_keep_probabilities_by_hand():
    tv = np.array([[0.1, -0.5, 0.3], [2.0, 2.0, -1.0]], np.float32)
    p = np.asarray(sp.della_keep_prob(tv, 0.5, 0.1))
    # row 0 ranks (ascending |x|): 0, 2, 1; row 1: tie 2.0/2.0 by index -> ranks 1, 2, 0
    close(p, [[0.4, 0.6, 0.5], [0.5, 0.6, 0.4]])


def test_rescale_matches_l1_norm():
    tv = np.array([1.0, -2.0, 3.0, -4.0], np.float32)
    keep = np.array([True, False, True, False])
    close(sp.rescale_masked(tv, keep, True), [2.5, 0, 7.5, 0])   # 10 / 4
    close(sp.rescale_masked(tv, keep, False), [1.0, 0, 3.0, 0])
    close(sp.rescale_masked(tv, np.zeros(4, bool), True), [0, 0, 0, 0])


def test_dare_statistics_and_determinism():
    tv = jnp.asarray(rand(100, 100)) + 3.0  # all entries nonzero
    k1, k2 = jax.random.split(KEY)
    for density in (0.1, 0.5, 0.9):
        out = np.asarray(sp.bernoulli(tv, density, k1, rescale=False))
        frac = np.count_nonzero(out) / out.size
        assert abs(frac - density) < 4 * np.sqrt(density * (1 - density) / out.size), frac
    a = np.asarray(sp.bernoulli(tv, 0.3, k1, rescale=True))
    np.testing.assert_array_equal(a, np.asarray(sp.bernoulli(tv, 0.3, k1, rescale=True)))
    assert not np.array_equal(a != 0, np.asarray(sp.bernoulli(tv, 0.3, k2)) != 0)
    close(np.abs(a).sum(), np.abs(np.asarray(tv)).sum(), tol=1e-4)  # L1 restored
    np.testing.assert_array_equal(np.asarray(sp.bernoulli(tv, 1.0, k1)), np.asarray(tv))


# ---- methods: hand-derived goldens ---------------------------------------------------------

def test_task_arithmetic_by_hand():
    base = np.array([1.0, 2.0, 3.0], np.float32)
    m1, m2 = np.array([2.0, 2.0, 2.0], np.float32), np.array([0.0, 4.0, 3.0], np.float32)
    # sum w tau = 0.5*[1,0,-1] + 1*[-1,2,0] = [-0.5, 2, -0.5]
    close(call("task_arithmetic", base, [m1, m2], weight=[0.5, 1.0], **{"lambda": 2.0}),
          [0.0, 6.0, 2.0])
    close(call("task_arithmetic", base, [m1, m2], weight=[0.5, 1.0], normalize=True),
          base + np.array([-0.5, 2, -0.5]) / 1.5)


def test_ties_by_hand():
    base = np.zeros(6, np.float32)
    m1 = np.array([3, -1, 2, 0.5, -4, 1], np.float32)
    m2 = np.array([-2, 2, 1, -0.5, -1, -3], np.float32)
    # density 0.5 keeps 3 each: [3,0,2,0,-4,0] and [-2,2,0,0,0,-3]; w2 = 3 wins entry 0
    close(call("ties", base, [m1, m2], weight=[1.0, 3.0], density=[0.5, 0.5]),
          [-2, 2, 2, 0, -4, -3])
    close(call("ties", base, [m1, m2], weight=[1.0, 1.0], density=[0.5, 0.5]),
          [3, 2, 2, 0, -4, -3])
    # without normalization the agreeing weighted entries are summed: entry 0 is 3 * -2
    close(call("ties", base, [m1, m2], weight=[1.0, 3.0], density=[0.5, 0.5], normalize=False),
          [-6, 6, 2, 0, -4, -9])


def test_ram_by_hand():
    base = np.zeros(5, np.float32)
    m1 = np.array([1.0, 2.0, 0.0, 1e-6, -3.0], np.float32)
    m2 = np.array([3.0, 0.0, 0.0, 0.0, 1.0], np.float32)
    # entry 0 shared -> mean 2; entry 1 unique -> 2; entry 3 below epsilon -> 0; entry 4 -> -1
    close(call("ram", base, [m1, m2], epsilon=1e-5), [2.0, 2.0, 0.0, 0.0, -1.0])
    # model 1: 2 shared, 1 unique -> rho 2 -> clip 0.2 -> 1.02; model 2: 2 shared, 0 unique
    close(call("ramplus_tl", base, [m1, m2], r=0.1, alpha=0.2, epsilon=1e-5),
          [2.0, 2.04, 0.0, 0.0, -1.0])
    close(call("ramplus_tl", base, [m1, m2], r=0.5, alpha=5.0, epsilon=1e-5),
          [2.0, 4.0, 0.0, 0.0, -1.0])


def test_sce_by_hand():
    base = np.zeros(4, np.float32)
    m1 = np.array([2.0, 0.0, 1.0, -1.0], np.float32)
    m2 = np.array([-2.0, 0.0, 3.0, 2.0], np.float32)
    # c ~ mean(tau^2) = 1.5, 4.25. Entry 0: sum 0 elects +, only model 1 agrees; entry 2: both
    # agree -> (1 * 1.5 + 3 * 4.25) / 5.75; entry 3: sum 1 elects +, only model 2 agrees
    close(call("sce", base, [m1, m2], select_topk=1.0), [2.0, 0.0, 14.25 / 5.75, 2.0])
    # variances 4, 0, 1, 2.25: 3 nonzero, select 0.7 keeps int(2.1) = 2 -> entries 0 and 3
    close(call("sce", base, [m1, m2], select_topk=0.7), [2.0, 0.0, 0.0, 2.0])
    # select 0.5 keeps int(1.5) = 1 (as mergekit truncates) -> entry 0, c = 1/2 each
    close(call("sce", base, [m1, m2], select_topk=0.5), [2.0, 0.0, 0.0, 0.0])


# ---- methods: numpy-oracle goldens on random 4x5 tensors -----------------------------------

def _inputs(n_models=3):
    base = rand(*SHAPE)
    return base, [base + rand(*SHAPE, scale=0.5) for _ in range(n_models)]


W3 = [0.7, 1.2, -0.4]
D3 = [0.5, 0.3, 0.8]


@pytest.mark.parametrize("normalize,lam,rescale", [(True, 1.0, False), (False, 0.8, True)])
def test_ties_oracle(normalize, lam, rescale):
    base, models = _inputs()
    tvs = [np_magnitude(t, d, rescale) for t, d in zip(tvs_of(base, models), D3)]
    want = base + np_combine(tvs, W3, True, normalize, lam)
    got = call("ties", base, models, weight=W3, density=D3, normalize=normalize,
               rescale=rescale, **{"lambda": lam})
    close(got, want)


def test_task_arithmetic_oracle():
    base, models = _inputs()
    close(call("task_arithmetic", base, models, weight=W3, density=D3, **{"lambda": 0.5}),
          base + np_combine(tvs_of(base, models), W3, False, False, 0.5))


@pytest.mark.parametrize("name,consensus", [("breadcrumbs", False), ("breadcrumbs_ties", True)])
def test_breadcrumbs_oracle(name, consensus):
    base, models = _inputs()
    gammas = [0.1, 0.05, 0.2]
    tvs = [np_outliers(t, d, g) for t, d, g in zip(tvs_of(base, models), D3, gammas)]
    close(call(name, base, models, weight=W3, density=D3, gamma=gammas),
          base + np_combine(tvs, W3, consensus, False))


@pytest.mark.parametrize("name,consensus", [("dare_ties", True), ("dare_linear", False)])
def test_dare_oracle(name, consensus):
    base, models = _inputs()
    tvs = [np_rescale(t, jax_mask(KEY, i, d, SHAPE), True)
           for i, (t, d) in enumerate(zip(tvs_of(base, models), D3))]
    close(call(name, base, models, KEY, weight=W3, density=D3),
          base + np_combine(tvs, W3, consensus, False))
    # normalize on, rescale off
    tvs = [t * jax_mask(KEY, i, d, SHAPE) for i, (t, d) in enumerate(zip(tvs_of(base, models), D3))]
    close(call(name, base, models, KEY, weight=W3, density=D3, normalize=True, rescale=False),
          base + np_combine(tvs, W3, consensus, True))


@pytest.mark.parametrize("name,consensus,normalize", [("della", True, True),
                                                      ("della_linear", False, False)])
def test_della_oracle(name, consensus, normalize):
    base, models = _inputs()
    eps = [0.15, 0.1, 0.15]
    tvs = []
    for i, (t, d, e) in enumerate(zip(tvs_of(base, models), D3, eps)):
        tvs.append(np_rescale(t, jax_mask(KEY, i, np_della_prob(t, d, e), SHAPE), True))
    close(call(name, base, models, KEY, weight=W3, density=D3, epsilon=eps),
          base + np_combine(tvs, W3, consensus, normalize))


def test_sce_oracle():
    base, models = _inputs()
    tv = np.stack(tvs_of(base, models))
    for topk in (1.0, 0.4):
        t = tv.copy()
        if topk < 1:
            var = t.var(0)
            k = np_sce_k(topk, int(np.count_nonzero(var)))
            t = t * np_topk_mask(var, k)
        c = (t ** 2).mean(axis=(1, 2))
        c = c / c.sum() if abs(c.sum()) >= 1e-6 else np.full(3, 1 / 3)
        m = np.sign(t) == np.where(t.sum(0) >= 0, 1, -1)
        cw = c[:, None, None] * m
        want = base + (t * cw).sum(0) / np.maximum(cw.sum(0), 1e-6)
        close(call("sce", base, models, select_topk=topk), want)


def test_ram_oracle():
    base, models = _inputs()
    models[0][0, :3] = base[0, :3]  # some inactive entries
    models[1][1, :] = base[1, :]
    tv = np.stack(tvs_of(base, models))
    a = np.abs(tv) > 1e-5
    cnt = a.sum(0)
    uniq, shared = cnt == 1, cnt > 1
    shared_part = (tv * a * shared).sum(0) / np.maximum(cnt, 1)
    close(call("ram", base, models), base + (tv * a * uniq).sum(0) + shared_part)
    r, alpha = 0.3, 0.5
    lam = 1 + r * np.clip((a & shared).sum((1, 2)) / np.maximum((a & uniq).sum((1, 2)), 1e-5),
                          0, alpha)
    want = base + (tv * a * uniq * lam[:, None, None]).sum(0) + shared_part
    close(call("ramplus_tl", base, models, r=r, alpha=alpha, epsilon=1e-5), want)


# ---- contracts: jit, vmap, dtype, errors ---------------------------------------------------

def _defaults(name, n):
    m = get(name)
    params = {k: [0.6] * n if k == "weight" else [v] * n for k, v in m.model_params.items()}
    params.update(m.global_params)
    if "density" in params:
        params["density"] = [0.5] * n
    return params


@pytest.mark.parametrize("name", ["task_arithmetic", "ties", "dare_ties", "dare_linear",
                                  "breadcrumbs", "breadcrumbs_ties", "della", "della_linear",
                                  "sce", "ram", "ramplus_tl"])
def test_jit_with_traced_params_matches_eager(name):
    base, models = _inputs(2)
    key = KEY if get(name).stochastic else None
    params = _defaults(name, 2)
    got = call(name, base, models, key, **params)
    want = get(name).fn(jnp.asarray(base), [jnp.asarray(m) for m in models], key=key, **params)
    assert got.dtype == jnp.float32
    close(got, want)


def _layered(n_layers=3):
    base = rand(n_layers, *SHAPE)
    return base, [base + rand(n_layers, *SHAPE, scale=0.5) for _ in range(2)]


@pytest.mark.parametrize("name", ["ties", "dare_ties", "della"])
def test_vmap_over_layers_matches_per_layer(name):
    fn = get(name).fn
    base, models = _layered()
    keys = jax.random.split(KEY, base.shape[0])
    density = jnp.array([[0.5, 0.3], [0.2, 0.6], [0.4, 0.4]], jnp.float32)  # per layer, per model

    def one(b, ms, k, d):
        return fn(b, ms, key=k, weight=[1.0, 0.5], density=[d[0], d[1]])

    batched = jax.jit(jax.vmap(one))(jnp.asarray(base), [jnp.asarray(m) for m in models], keys,
                                     density)
    one_jit = jax.jit(one)
    for layer in range(base.shape[0]):
        per = one_jit(jnp.asarray(base[layer]), [jnp.asarray(m[layer]) for m in models], keys[layer],
                  density[layer])
        close(batched[layer], per, tol=1e-6)


def test_returns_base_dtype():
    base, models = _inputs(2)
    b16 = jnp.asarray(base, jnp.bfloat16)
    out = get("ties").fn(b16, [jnp.asarray(m, jnp.bfloat16) for m in models], weight=[1, 1],
                         density=[0.5, 0.5])
    assert out.dtype == jnp.bfloat16


def test_user_errors():
    base, models = _inputs(2)
    with pytest.raises(JmergeError, match="epsilon"):
        get("della").fn(base, models, key=KEY, weight=[1, 1], density=[0.1, 0.5], epsilon=0.15)
    with pytest.raises(JmergeError, match="weight"):
        get("ties").fn(base, models, density=[0.5, 0.5])
    with pytest.raises(JmergeError, match="key"):
        get("dare_ties").fn(base, models, weight=[1, 1], density=[0.5, 0.5])
    with pytest.raises(JmergeError, match="3 values for 2 models"):
        get("ties").fn(base, models, weight=[1, 1, 1])
    with pytest.raises(JmergeError, match="base"):
        get("ram").fn(None, models)
