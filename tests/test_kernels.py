"""Pallas kernels in interpret mode on CPU against numpy goldens and their jnp references.

Two layouts cover the kernel plumbing: ODD (3367 elements: zero-padded to 27 rows of 128, and
a ragged last block with 8-row blocks) and EVEN (40x128: no padding, ragged last block with
16-row blocks). Goldens are written in numpy from the published formulas.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmerge.errors import JmergeError
from jmerge.kernels import dare_fused as D
from jmerge.kernels import magnitude_count as M
from jmerge.kernels import ties_fused as T

ODD, EVEN = (37, 91), (40, 128)
ROWS = {ODD: 8, EVEN: 16}
# every layout in f32, and bf16 on the padded one (one compile per case, so not the full grid)
CASES = [(ODD, np.float32), (EVEN, np.float32), (ODD, jnp.bfloat16)]


def tied_values(shape, seed, dtype):
    """Small-integer multiples of 0.25: many exact ties, zeros and both signs."""
    rng = np.random.default_rng(seed)
    return np.asarray(rng.integers(-12, 13, size=shape) * 0.25, dtype=dtype)


# --- shared jitted wrappers (one compile per shape/dtype) -------------------------------------

@functools.partial(jax.jit, static_argnames="br")
def count_kernel(x, t, br):
    return M.magnitude_count_kernel(x, t, interpret=True, block_rows=br)


@functools.partial(jax.jit, static_argnames=("br", "splits"))
def kth_kernel(x, k, br, splits=16):
    return M.kth_largest_abs_kernel(x, k, splits=splits, interpret=True, block_rows=br)


kth_reference = jax.jit(M.kth_largest_abs_reference)


@functools.partial(jax.jit, static_argnames=("br", "normalize"))
def ties_thr_kernel(tvs, w, thr, br, normalize=True):
    return T.ties_merge_kernel(tvs, w, thresholds=thr, normalize=normalize, interpret=True,
                               block_rows=br)


@functools.partial(jax.jit, static_argnames="br")
def ties_mask_kernel(tvs, w, masks, br):
    return T.ties_merge_kernel(list(tvs), w, masks=list(masks), interpret=True, block_rows=br)


@functools.partial(jax.jit, static_argnames="br")
def dare_kernel(x, density, key, br):
    return D.dare_kernel(x, density, key, interpret=True, block_rows=br)


# --- magnitude_count -------------------------------------------------------------------------

THRESHOLDS = np.array([0.0, -1.0, -0.0, 0.25, 0.5, 1.0, 1.25, 3.0, 3.01, np.inf, 1e-30],
                      np.float32)


@pytest.mark.parametrize("shape,dtype", CASES)
def test_magnitude_count_matches_numpy(shape, dtype):
    x = tied_values(shape, 0, dtype)
    golden = (np.abs(x.astype(np.float32)).reshape(1, -1) >= THRESHOLDS[:, None]).sum(1)
    got = count_kernel(jnp.asarray(x), jnp.asarray(THRESHOLDS), ROWS[shape])
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got), golden)
    np.testing.assert_array_equal(np.asarray(M.magnitude_count_reference(x, THRESHOLDS)), golden)


def test_magnitude_count_denormals_and_nan():
    x = np.zeros(ODD, np.float32)
    x[0, 0], x[0, 1], x[0, 2] = 1e-40, -2e-40, np.nan  # two denormals and a NaN
    t = np.array([1e-40, 1.5e-40, 3e-40, np.inf], np.float32)
    got = count_kernel(jnp.asarray(x), jnp.asarray(t), 8)
    # bit-pattern order: denormals compare exactly; NaN counts above +inf
    np.testing.assert_array_equal(np.asarray(got), [3, 2, 1, 1])


# --- kth_largest_abs -------------------------------------------------------------------------

@pytest.mark.parametrize("shape,dtype", CASES)
def test_kth_largest_abs_matches_sort(shape, dtype):
    x = tied_values(shape, 1, dtype)
    x.reshape(-1)[5] = 7.1  # a unique maximum
    desc = np.sort(np.abs(x.astype(np.float32)).reshape(-1))[::-1]
    n = desc.size
    zeros_from = int(np.argmax(desc == 0)) + 1  # k at which the k-th largest is 0
    for k in [1, 2, n // 10, n // 2, zeros_from, n]:
        want = desc[k - 1]
        assert float(kth_kernel(jnp.asarray(x), k, ROWS[shape])) == want, k
        assert float(kth_reference(jnp.asarray(x), k)) == want, k


def test_kth_largest_abs_continuous_values_and_splits():
    x = np.random.default_rng(2).standard_normal(ODD).astype(np.float32) * 1e-3
    desc = np.sort(np.abs(x).reshape(-1))[::-1]
    for splits in (16, 128):
        for k in (1, 337, 3000):
            assert float(kth_kernel(jnp.asarray(x), k, 8, splits=splits)) == desc[k - 1]


def test_kth_largest_abs_keep_mask_keeps_ties():
    x = jnp.asarray(tied_values(ODD, 3, np.float32))
    k = 1000
    thr = M.kth_largest_abs(x, k)  # CPU: reference path
    kept = int(jnp.sum(jnp.abs(x) >= thr))
    assert kept >= k and int(jnp.sum(jnp.abs(x) > thr)) < k


def test_kth_largest_abs_rejects_bad_k():
    x = jnp.ones((10,), jnp.float32)
    for k in (0, 11):
        with pytest.raises(JmergeError):
            M.kth_largest_abs(x, k)
    with pytest.raises(JmergeError):
        M.kth_largest_abs(x, 3, splits=12, interpret=True)


# --- ties_fused ------------------------------------------------------------------------------

def ties_numpy(tvs, w, keep, normalize=True):
    tvs = np.asarray(tvs, np.float64)
    s = w.reshape(-1, *[1] * (tvs.ndim - 1)) * tvs * keep
    elect = np.sign(s.sum(0))
    agree = np.sign(s) == elect
    num = (s * agree).sum(0)
    if not normalize:
        return num
    den = (w.reshape(-1, *[1] * (tvs.ndim - 1)) * keep * agree).sum(0)
    return np.where(den != 0, num / np.where(den != 0, den, 1), 0)


def test_ties_hand_example():
    tvs = jnp.array([[1.0, -2.0, 3.0, 0.0, 1.0], [1.0, 0.5, -0.5, 0.0, -1.0]])
    w = jnp.array([1.0, 1.0])
    ones = jnp.ones_like(tvs)
    # elect signs (+, -, +, 0, 0); column 4 cancels exactly, column 3 is all zero
    out = T.ties_merge_kernel(tvs, w, masks=ones, interpret=True)
    np.testing.assert_allclose(np.asarray(out), [1.0, -2.0, 3.0, 0.0, 0.0])
    w = jnp.array([1.0, 2.0])  # s = [[1,-2,3,0,1],[2,1,-1,0,-2]]: elect (+, -, +, 0, -)
    out = T.ties_merge_kernel(tvs, w, masks=ones, interpret=True)
    np.testing.assert_allclose(np.asarray(out), [1.0, -2.0, 3.0, 0.0, -1.0])
    out = T.ties_merge_kernel(tvs, w, masks=ones, normalize=False, interpret=True)
    np.testing.assert_allclose(np.asarray(out), [3.0, -2.0, 3.0, 0.0, -2.0])
    # model 0 masked out in column 0 only: the mean is model 1's value alone
    m = ones.at[0, 0].set(0.0)
    out = T.ties_merge_kernel(tvs, w, masks=m, interpret=True)
    np.testing.assert_allclose(np.asarray(out)[0], 1.0)


@pytest.mark.parametrize("shape,dtype", CASES)
def test_ties_thresholds_match_numpy(shape, dtype):
    tvs = np.stack([tied_values(shape, s, dtype) for s in (4, 5, 6)])
    w = np.array([1.0, 0.5, 2.0], np.float32)
    thr = np.array([0.5, 1.0, 2.75], np.float32)  # exact tie values: |tau| == thr is kept
    keep = np.abs(tvs.astype(np.float32)) >= thr[:, None, None]
    golden = ties_numpy(tvs.astype(np.float32), w, keep)
    got = ties_thr_kernel(jnp.asarray(tvs), jnp.asarray(w), jnp.asarray(thr), ROWS[shape])
    assert got.dtype == tvs.dtype and got.shape == shape
    tol = 1e-6 if dtype == np.float32 else 1e-2  # measured 5e-8 (f32) and 3.2e-3 (bf16 rounding)
    np.testing.assert_allclose(np.asarray(got, np.float32), golden, rtol=tol, atol=tol)
    ref = T.ties_merge_reference(jnp.asarray(tvs), jnp.asarray(w), thresholds=jnp.asarray(thr))
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(ref, np.float32))
    assert np.any(golden == 0) and np.any(golden != 0)


def test_ties_masks_list_and_unnormalized():
    shape = ODD
    tvs = np.stack([tied_values(shape, s, np.float32) for s in (7, 8)])
    masks = np.random.default_rng(9).random(tvs.shape) < 0.4
    w = np.array([0.7, 1.3], np.float32)
    got = ties_mask_kernel(jnp.asarray(tvs), jnp.asarray(w), jnp.asarray(masks), 8)
    np.testing.assert_allclose(np.asarray(got), ties_numpy(tvs, w, masks), rtol=1e-6, atol=1e-6)
    got = ties_thr_kernel(jnp.asarray(tvs), jnp.asarray(w), jnp.zeros(2), 8, normalize=False)
    np.testing.assert_allclose(np.asarray(got), ties_numpy(tvs, w, np.ones_like(masks), False),
                               rtol=1e-6, atol=1e-6)


def test_ties_rejects_bad_inputs():
    tv = [jnp.ones((4,)), jnp.ones((4,))]
    with pytest.raises(JmergeError):
        T.ties_merge(tv, jnp.ones(3))
    with pytest.raises(JmergeError):
        T.ties_merge(tv, jnp.ones(2), masks=tv, thresholds=jnp.ones(2))
    with pytest.raises(JmergeError):
        T.ties_merge([jnp.ones((4,)), jnp.ones((5,))], jnp.ones(2))


# --- dare_fused ------------------------------------------------------------------------------

def dare_keep_numpy(n, density, key):
    """The documented stream, in numpy uint32."""
    s0, s1 = (np.uint32(v) for v in np.asarray(jax.random.bits(key, (2,), jnp.uint32)))

    def fmix(h):
        h = h ^ (h >> np.uint32(16))
        h = h * np.uint32(0x85EBCA6B)
        h = h ^ (h >> np.uint32(13))
        h = h * np.uint32(0xC2B2AE35)
        return h ^ (h >> np.uint32(16))

    with np.errstate(over="ignore"):
        i = np.arange(n, dtype=np.uint32)
        h = fmix(fmix((i * np.uint32(0x9E3779B9)) ^ s0) ^ s1)
    return (h >> np.uint32(8)) < np.uint32(round(density * 2**24))


@pytest.mark.parametrize("shape,dtype", CASES)
def test_dare_kernel_matches_documented_stream(shape, dtype):
    x = np.random.default_rng(10).uniform(0.5, 2.0, shape).astype(dtype)  # no zeros
    key = jax.random.key(11)
    got = dare_kernel(jnp.asarray(x), 0.3, key, ROWS[shape])
    keep = dare_keep_numpy(x.size, 0.3, key).reshape(shape)
    scale = np.float32(1) / np.float32(0.3)
    golden = np.where(keep, x.astype(np.float32) * scale, 0).astype(dtype)
    assert got.dtype == x.dtype
    np.testing.assert_array_equal(np.asarray(got), golden)
    np.testing.assert_array_equal(np.asarray(D.dare_reference(x, 0.3, key)), golden)


def test_dare_stream_independent_of_block_size():
    x = jnp.ones(ODD, jnp.float32)
    key = jax.random.key(12)
    a = dare_kernel(x, 0.5, key, 8)
    b = D.dare_kernel(x, 0.5, key, interpret=True, block_rows=32)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_dare_statistics():
    n, density = 1 << 16, 0.2
    x = jnp.ones((n,), jnp.float32)
    out = np.asarray(D.dare(x, density, jax.random.key(13)))  # CPU: reference, same stream
    kept = out != 0
    sigma = np.sqrt(density * (1 - density) / n)
    assert abs(kept.mean() - density) < 4 * sigma
    np.testing.assert_allclose(out[kept], 1 / np.float32(density))
    assert abs(out.mean() - 1.0) < 4 * sigma / density  # expectation preserved
    # runs of the mask are not correlated with neighbours
    assert abs(np.mean(kept[1:] & kept[:-1]) - density**2) < 4 * sigma
    other = np.asarray(D.dare(x, density, jax.random.key(14))) != 0
    assert 0 < np.mean(kept != other) and abs(np.mean(kept & other) - density**2) < 4 * sigma


def test_dare_density_edges():
    x = jnp.arange(1.0, 11.0)
    np.testing.assert_array_equal(np.asarray(D.dare(x, 1.0, jax.random.key(0))), np.asarray(x))
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(JmergeError):
            D.dare(x, bad, jax.random.key(0))


# --- dispatch --------------------------------------------------------------------------------

def test_dispatch_uses_reference_on_cpu(monkeypatch):
    assert jax.default_backend() == "cpu"

    def boom(*a, **k):
        raise AssertionError("kernel called on CPU without interpret=True")

    monkeypatch.setattr(M, "magnitude_count_kernel", boom)
    monkeypatch.setattr(M, "kth_largest_abs_kernel", boom)
    monkeypatch.setattr(T, "ties_merge_kernel", boom)
    monkeypatch.setattr(D, "dare_kernel", boom)
    x = jnp.array([1.0, -2.0, 3.0, 0.0])
    np.testing.assert_array_equal(np.asarray(M.magnitude_count(x, jnp.array([1.0, 2.5]))), [3, 1])
    assert float(M.kth_largest_abs(x, 2)) == 2.0
    np.testing.assert_allclose(np.asarray(T.ties_merge(jnp.stack([x, x]), jnp.ones(2))),
                               np.asarray(x))
    D.dare(x, 0.5, jax.random.key(0))
    with pytest.raises(AssertionError):  # interpret=True does select the kernel
        M.magnitude_count(x, jnp.array([1.0]), interpret=True)


def test_dispatch_errors():
    x = jnp.ones((4,))
    with pytest.raises(JmergeError):
        M.magnitude_count(x, jnp.ones(1), backend="pallas")  # no GPU/TPU here
    with pytest.raises(JmergeError):
        M.magnitude_count(x, jnp.ones(1), backend="triton")
    np.testing.assert_array_equal(np.asarray(M.magnitude_count(x, jnp.ones(1),
                                                               backend="reference")), [4])


# --- sharded wrappers ------------------------------------------------------------------------

def test_sharded_count_and_kth_on_a_mesh():
    """8 simulated devices, rows over fsdp and columns over tensor: each device counts only its
    own 10x64 block, so the answer is right only if the per-device counts are summed."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    assert jax.device_count() == 8
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("fsdp", "tensor"))
    spec = P("fsdp", "tensor")
    x = tied_values(EVEN, 15, np.float32)
    xs = jax.device_put(jnp.asarray(x), NamedSharding(mesh, spec))
    golden = (np.abs(x).reshape(1, -1) >= THRESHOLDS[:, None]).sum(1)
    got = M.magnitude_count_sharded(xs, jnp.asarray(THRESHOLDS), mesh, spec, interpret=True,
                                    block_rows=16)
    np.testing.assert_array_equal(np.asarray(got), golden)
    desc = np.sort(np.abs(x).reshape(-1))[::-1]
    kth = jax.jit(lambda v: M.kth_largest_abs_sharded(v, 700, mesh, spec))  # reference count
    assert float(kth(xs)) == desc[699]


def test_kernels_under_vmap_over_layers():
    # The merge engine vmaps methods over the stacked layer axis; program ids must stay per-slice.
    x = jnp.asarray(tied_values((3, 20, 128), 16, np.float32))
    key = jax.random.key(17)
    got = jax.vmap(lambda v: D.dare_kernel(v, 0.5, key, interpret=True, block_rows=8))(x)
    want = jax.vmap(lambda v: D.dare_reference(v, 0.5, key))(x)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    counts = jax.vmap(lambda v: M.magnitude_count_kernel(v, jnp.array([0.5, 2.0]),
                                                         interpret=True, block_rows=8))(x)
    golden = [(np.abs(np.asarray(x[i]))[None] >= np.array([0.5, 2.0])[:, None, None]).sum((1, 2))
              for i in range(3)]
    np.testing.assert_array_equal(np.asarray(counts), golden)
