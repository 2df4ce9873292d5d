"""Fused DARE: Bernoulli(keep = density) drop mask + rescale by 1/density, one pass.

Random stream (the same in the kernel and the jnp reference, on every backend, for any block
size or tensor layout, so a merge is reproducible bit for bit from its key):
    (s0, s1) = jax.random.bits(key, (2,), uint32)           # any key type or raw uint32[2] key
    h_i = fmix32(fmix32(i * 0x9E3779B9 ^ s0) ^ s1)           # i = flat (row-major) element index
    keep_i = (h_i >> 8) < round(density * 2**24)             # 24-bit uniform draw
    out_i = keep_i ? x_i * (1 / density) : 0                 # float32 math, cast to x.dtype
fmix32 is the MurmurHash3 finaliser. This is not jax.random's stream (that would need a
threefry counter per element inside the kernel); it is a keyed counter-based hash: each
element's draw depends only on (key, index), like DESIGN.md's fold_in(seed, path) per tensor.
The keep probability is density quantised to 2**-24. The rescale multiplies by the float32
reciprocal (not a division: GPU division is approximate, so results would differ by an ulp).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from jmerge.errors import JmergeError
from jmerge.kernels import _common as C


def _i32(c: int) -> int:
    """A uint32 constant as the Python int with the same int32 bits (no captured arrays,
    which a Pallas kernel may not close over)."""
    return int(np.array(c, np.uint32).view(np.int32))


_GOLDEN, _M1, _M2 = _i32(0x9E3779B9), _i32(0x85EBCA6B), _i32(0xC2B2AE35)


def _fmix32(h: jax.Array) -> jax.Array:
    srl = jax.lax.shift_right_logical
    h = h ^ srl(h, 16)
    h = h * _M1  # int32 multiply wraps like uint32
    h = h ^ srl(h, 13)
    h = h * _M2
    return h ^ srl(h, 16)


def keep_draw(index: jax.Array, s0, s1) -> jax.Array:
    """24-bit uniform integer in [0, 2**24) for each int32 flat index."""
    h = _fmix32(_fmix32(index * _GOLDEN ^ s0) ^ s1)
    return jax.lax.shift_right_logical(h, 8)


def _params(key, density):
    """int32 [s0, s1, keep threshold, 0] and float32 [1 / density]."""
    if isinstance(density, (int, float)) and not 0.0 < density <= 1.0:
        raise JmergeError(f"DARE density must be in (0, 1], got {density}")
    seeds = jax.lax.bitcast_convert_type(jax.random.bits(key, (2,), jnp.uint32), jnp.int32)
    d = jnp.asarray(density, jnp.float32).reshape(1)
    thr = jnp.round(d * 2.0**24).astype(jnp.int32)
    return jnp.concatenate([seeds, thr, jnp.zeros((1,), jnp.int32)]), 1.0 / d


# --- reference -------------------------------------------------------------------------------

def dare_reference(x: jax.Array, density, key) -> jax.Array:
    C.check_size(x.size)
    p, scale = _params(key, density)
    idx = jnp.arange(x.size, dtype=jnp.int32).reshape(x.shape)
    keep = keep_draw(idx, p[0], p[1]) < p[2]
    return jnp.where(keep, x.astype(jnp.float32) * scale[0], 0.0).astype(x.dtype)


# --- kernel ----------------------------------------------------------------------------------

def _dare_kernel(p_ref, s_ref, x_ref, o_ref, *, br: int):
    keep = keep_draw(C.flat_index(br), p_ref[0], p_ref[1]) < p_ref[2]
    val = x_ref[...].astype(jnp.float32) * s_ref[0]
    o_ref[...] = jnp.where(keep, val, 0.0).astype(o_ref.dtype)


def dare_kernel(x: jax.Array, density, key, *, interpret: bool = False,
                block_rows: int = 64) -> jax.Array:
    C.check_size(x.size)
    where = C.target(interpret)
    p, scale = _params(key, density)
    rows = C.as_rows(x)
    br = C.block_rows(rows.shape[0], block_rows, where)
    out = pl.pallas_call(
        functools.partial(_dare_kernel, br=br),
        out_shape=jax.ShapeDtypeStruct(rows.shape, x.dtype),
        grid=(pl.cdiv(rows.shape[0], br),),
        in_specs=[C.scalars_block(4, where), C.scalars_block(1, where), C.row_block(br)],
        out_specs=C.row_block(br),
        compiler_params=C.compiler_params(where),
        interpret=interpret,
        name="dare",
    )(p, scale, rows)
    return C.from_rows(out, x.shape)


def dare(x: jax.Array, density, key, *, backend: str = "auto", interpret: bool = False,
         block_rows: int = 64) -> jax.Array:
    """DARE drop-and-rescale of x (a task vector) with keep probability `density`."""
    if C.use_kernel(backend, interpret):
        return dare_kernel(x, density, key, interpret=interpret, block_rows=block_rows)
    return dare_reference(x, density, key)
