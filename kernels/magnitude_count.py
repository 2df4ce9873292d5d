"""Multi-threshold magnitude count and the exact k-th largest |x| built on it.

`magnitude_count(x, t)` returns counts[b] = #{|x| >= t[b]} for B thresholds in one read of x.
`kth_largest_abs(x, k)` finds the exact k-th largest |x| by a radix-style search on the int32
bit pattern of float32 |x| (monotone for non-negative floats): each pass splits the remaining
key interval into `splits` parts and counts all split points in one read, so 16 splits need 8
passes where plain bisection needs 31. Keep mask for TIES-style trimming: |x| >= result (ties
at the threshold are kept, as in the TIES paper).

Comparisons are made on bit patterns, so denormals are exact and NaN counts as larger than
+inf (a NaN element is counted for every threshold). Counts are int32: one tensor must have
fewer than 2**31 elements; sum per-tensor counts in a wider type for global (all-model) scope.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jmerge.errors import JmergeError
from jmerge.kernels import _common as C

_KEY_LIMIT = 2**31  # keys lie in [0, 2**31)
_PAD_KEY = 2**31 - 1


def threshold_keys(t: jax.Array) -> jax.Array:
    """Float thresholds -> int32 keys with  |x| >= t  <=>  key(x) >= key(t)  (for non-NaN x)."""
    t = jnp.asarray(t, jnp.float32).reshape(-1)
    bits = jax.lax.bitcast_convert_type(t, jnp.int32)
    # Test the sign on the bits: a float compare would flush denormal thresholds to 0 on CPU.
    return jnp.where(bits > 0, bits, 0)  # t <= 0 (incl. -0.0): every element qualifies


# --- reference -------------------------------------------------------------------------------

def count_keys_reference(x: jax.Array, tkeys: jax.Array) -> jax.Array:
    key = C.abs_key(x).reshape(-1)
    # lax.map, not vmap: XLA:CPU runs the vmapped [B, n] compare-reduce ~15x slower.
    return jax.lax.map(lambda tk: jnp.sum(key >= tk, dtype=jnp.int32), tkeys)


def magnitude_count_reference(x: jax.Array, t: jax.Array) -> jax.Array:
    return count_keys_reference(x, threshold_keys(t))


def kth_largest_abs_reference(x: jax.Array, k) -> jax.Array:
    """Plain bisection on the bit pattern: 31 single-threshold counts."""
    key = C.abs_key(x).reshape(-1).astype(jnp.uint32)
    k = jnp.asarray(k, jnp.int32)

    def body(_, lo_hi):
        lo, hi = lo_hi  # invariant: count(key >= lo) >= k > count(key >= hi)
        mid = lo + (hi - lo) // 2
        ok = jnp.sum(key >= mid, dtype=jnp.int32) >= k
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo, _ = jax.lax.fori_loop(0, 31, body, (jnp.uint32(0), jnp.uint32(_KEY_LIMIT)))
    return jax.lax.bitcast_convert_type(lo, jnp.float32)


# --- kernel ----------------------------------------------------------------------------------

def _count_kernel(tk_ref, x_ref, o_ref, *, n: int, br: int, nb: int):
    key = C.abs_key(x_ref[...])
    key = jnp.where(C.valid_mask(n, br), key, -1)  # -1 is below every threshold key
    lane = jax.lax.broadcasted_iota(jnp.int32, (1, nb), 1)

    def one(b, acc):  # the block stays in registers/VMEM across all thresholds
        c = jnp.sum((key >= tk_ref[b]).astype(jnp.int32))
        return jnp.where(lane == b, c, acc)

    # A rolled loop keeps compile time flat in the number of thresholds.
    o_ref[...] = jax.lax.fori_loop(0, nb, one, jnp.zeros((1, nb), jnp.int32))


def _count_rows(rows: jax.Array, n: int, tkeys: jax.Array, *, interpret: bool,
                block_rows: int) -> jax.Array:
    """Counts over a [R, LANES] view whose first n flat elements are the tensor."""
    where = C.target(interpret)
    nt = tkeys.shape[0]
    tk = C.pad_scalars(tkeys.astype(jnp.int32), _PAD_KEY)
    nb = tk.shape[0]
    br = C.block_rows(rows.shape[0], block_rows, where)
    grid = pl.cdiv(rows.shape[0], br)
    # One partial count vector per block (GPU blocks run concurrently, so no shared
    # accumulator); the [grid, B] sum afterwards is negligible.
    partial = pl.pallas_call(
        functools.partial(_count_kernel, n=n, br=br, nb=nb),
        out_shape=jax.ShapeDtypeStruct((grid, 1, nb), jnp.int32),
        grid=(grid,),
        in_specs=[C.scalars_block(nb, where), C.row_block(br)],
        out_specs=pl.BlockSpec((None, 1, nb), lambda i: (i, 0, 0)),
        compiler_params=C.compiler_params(where),
        interpret=interpret,
        name="magnitude_count",
    )(tk, rows)
    return jnp.sum(partial[:, 0, :nt], axis=0, dtype=jnp.int32)


def magnitude_count_kernel(x: jax.Array, t: jax.Array, *, interpret: bool = False,
                           block_rows: int = 64) -> jax.Array:
    C.check_size(x.size)
    return _count_rows(C.as_rows(x), x.size, threshold_keys(t), interpret=interpret,
                       block_rows=block_rows)


def magnitude_count(x: jax.Array, t: jax.Array, *, backend: str = "auto",
                    interpret: bool = False, block_rows: int = 64) -> jax.Array:
    """counts[b] = #{|x| >= t[b]} as int32, shape [B]; t is cast to float32."""
    if C.use_kernel(backend, interpret):
        return magnitude_count_kernel(x, t, interpret=interpret, block_rows=block_rows)
    C.check_size(x.size)
    return magnitude_count_reference(x, t)


# --- k-th largest |x| --------------------------------------------------------------------------

def _check_k(k, n: int):
    try:
        kv = int(k)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError):
        return jnp.clip(jnp.asarray(k, jnp.int32), 1, n)  # traced k: clamp rather than fail
    if not 1 <= kv <= n:
        raise JmergeError(f"k must be in [1, {n}] for a tensor of {n} elements, got {kv}")
    return jnp.int32(kv)


def kth_largest_abs_kernel(x: jax.Array, k, *, splits: int = 16, interpret: bool = False,
                           block_rows: int = 64) -> jax.Array:
    C.check_size(x.size)
    k = _check_k(k, x.size)
    rows = C.as_rows(x)  # once, not per pass
    return _radix_select(
        lambda tk: _count_rows(rows, x.size, tk, interpret=interpret, block_rows=block_rows),
        k, splits)


def _radix_select(count_keys, k, splits: int) -> jax.Array:
    """Largest key v with count_keys([v])[0] >= k, `splits` candidates per pass, as float32."""
    if splits < 2 or splits & (splits - 1):
        raise JmergeError(f"splits must be a power of two >= 2, got {splits}")
    lo, span = jnp.int32(0), _KEY_LIMIT  # invariant: count(key >= lo) >= k; answer < lo + span
    while span > 1:
        step = max(span // splits, 1)
        offsets = jnp.arange(step, span, step, dtype=jnp.int32)  # static: lo + offset < 2**31
        tkeys = lo + offsets
        lo = jnp.max(jnp.where(count_keys(tkeys) >= k, tkeys, lo))
        span = step
    return jax.lax.bitcast_convert_type(lo, jnp.float32)


def kth_largest_abs(x: jax.Array, k, *, splits: int = 16, backend: str = "auto",
                    interpret: bool = False, block_rows: int = 64) -> jax.Array:
    """Exact k-th largest |x| (k = 1 is the max) as float32. k is 1-based; a traced k is
    clamped to [1, x.size]."""
    if C.use_kernel(backend, interpret):
        return kth_largest_abs_kernel(x, k, splits=splits, interpret=interpret,
                                      block_rows=block_rows)
    C.check_size(x.size)
    return kth_largest_abs_reference(x, _check_k(k, x.size))


# --- sharded inputs ----------------------------------------------------------------------------

def _mesh_axes(spec: P) -> tuple[str, ...]:
    axes = []
    for part in spec:
        if part is not None:
            axes += list(part) if isinstance(part, tuple) else [part]
    return tuple(axes)


def _sharded_key_counter(x, mesh: Mesh, spec: P, *, backend: str, interpret: bool,
                         block_rows: int):
    """tkeys -> global counts for an x laid out as `spec` on `mesh`: each device counts its own
    shard (a pallas_call is not auto-partitioned) and the int32 counts are psummed."""
    kernel = C.use_kernel(backend, interpret)
    axes = _mesh_axes(spec)

    def local(xs, tkeys):
        if kernel:
            c = _count_rows(C.as_rows(xs), xs.size, tkeys, interpret=interpret,
                            block_rows=block_rows)
        else:
            c = count_keys_reference(xs, tkeys)
        return jax.lax.psum(c, axes) if axes else c

    counted = jax.shard_map(local, mesh=mesh, in_specs=(spec, P()), out_specs=P(),
                            check_vma=False)
    return lambda tkeys: counted(x, tkeys)


def magnitude_count_sharded(x: jax.Array, t: jax.Array, mesh: Mesh, spec: P, *,
                            backend: str = "auto", interpret: bool = False,
                            block_rows: int = 64) -> jax.Array:
    """`magnitude_count` of an x sharded as `spec` on `mesh` (the total must stay < 2**31)."""
    C.check_size(x.size)
    count = _sharded_key_counter(x, mesh, spec, backend=backend, interpret=interpret,
                                 block_rows=block_rows)
    return count(threshold_keys(t))


def kth_largest_abs_sharded(x: jax.Array, k, mesh: Mesh, spec: P, *, splits: int = 16,
                            backend: str = "auto", interpret: bool = False,
                            block_rows: int = 64) -> jax.Array:
    """`kth_largest_abs` of an x sharded as `spec` on `mesh`: per-device counts + psum, so no
    device ever holds more than its shard. On CPU the per-shard count is the jnp reference."""
    C.check_size(x.size)
    k = _check_k(k, x.size)
    count = _sharded_key_counter(x, mesh, spec, backend=backend, interpret=interpret,
                                 block_rows=block_rows)
    return _radix_select(count, k, splits)
