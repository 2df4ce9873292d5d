"""Fused TIES sign election + disjoint weighted mean, one pass over K task vectors.

With s_i = w_i * tau_i * m_i (m_i the keep mask, from a given mask or from |tau_i| >= thr_i):
    elect = sign(sum_i s_i)
    agree_i = sign(s_i) == elect
    out = sum_i s_i [agree_i] / sum_i w_i m_i [agree_i]     (0 where the denominator is 0)
With normalize=False the numerator alone is returned. This matches mergekit's `ties`
(consensus "sum" on the weighted deltas) except that mergekit replaces |den| < 1e-8 by 1, while
here only an exact zero gives 0. All accumulation is float32, in model order i = 0..K-1; the
result is cast to the task vectors' dtype (or `out_dtype`).

Task vectors (and masks) are a list of same-shape arrays or one stacked [K, ...] array; a
stacked array is read in place by K block specs, never copied. Thresholds compare bit patterns
like `magnitude_count`, so `thresholds=kth_largest_abs(tau_i, k_i)` keeps ties at the threshold.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jmerge.errors import JmergeError
from jmerge.kernels import _common as C
from jmerge.kernels.magnitude_count import threshold_keys

Arrays = jax.Array | Sequence[jax.Array]


def _as_list(xs: Arrays) -> list[jax.Array]:
    return [xs[i] for i in range(xs.shape[0])] if hasattr(xs, "ndim") else list(xs)


def _count_and_shape(xs: Arrays, what: str) -> tuple[int, tuple[int, ...]]:
    """(K, per-model shape) of a stacked array or a list, without slicing a stacked array."""
    if hasattr(xs, "ndim"):
        if xs.ndim < 1 or xs.shape[0] < 1:
            raise JmergeError(f"ties: {what} need a leading model axis, got shape {xs.shape}")
        return xs.shape[0], tuple(xs.shape[1:])
    shapes = sorted({tuple(x.shape) for x in xs})
    if len(shapes) != 1:
        raise JmergeError(f"ties: {what} must be one or more arrays of one shape, got {shapes}")
    return len(xs), shapes[0]


def _check(tvs, weights, masks, thresholds) -> tuple[int, tuple[int, ...]]:
    k, shape = _count_and_shape(tvs, "task vectors")
    if jnp.shape(weights) != (k,):
        raise JmergeError(f"ties: weights must have shape ({k},), got {jnp.shape(weights)}")
    if masks is not None and thresholds is not None:
        raise JmergeError("ties: pass masks or thresholds, not both")
    if thresholds is not None and jnp.shape(thresholds) != (k,):
        raise JmergeError(f"ties: thresholds must have shape ({k},), got {jnp.shape(thresholds)}")
    if masks is not None and _count_and_shape(masks, "masks") != (k, shape):
        raise JmergeError(f"ties: masks must be {k} arrays of shape {shape}")
    return k, shape


def _out_dtype(tvs, out_dtype):
    if out_dtype is not None:
        return jnp.dtype(out_dtype)
    if hasattr(tvs, "ndim"):
        return tvs.dtype
    return jnp.result_type(*tvs)


# --- reference -------------------------------------------------------------------------------

def ties_merge_reference(tvs: Arrays, weights, *, masks: Arrays | None = None,
                         thresholds=None, normalize: bool = True, out_dtype=None) -> jax.Array:
    k, shape = _check(tvs, weights, masks, thresholds)
    dtype = _out_dtype(tvs, out_dtype)
    tv_list = _as_list(tvs)
    w = jnp.asarray(weights, jnp.float32)
    tk = None if thresholds is None else threshold_keys(thresholds)
    s, wm = [], []
    for i, tv in enumerate(tv_list):
        if tk is not None:
            m = (C.abs_key(tv) >= tk[i]).astype(jnp.float32)
        elif masks is not None:
            m = jnp.asarray(masks[i]).astype(jnp.float32)
        else:
            m = jnp.ones(shape, jnp.float32)
        s.append(w[i] * tv.astype(jnp.float32) * m)
        wm.append(w[i] * m)
    elect = jnp.sign(functools.reduce(jnp.add, s))
    agree = [jnp.sign(si) == elect for si in s]
    num = functools.reduce(jnp.add, [jnp.where(a, si, 0.0) for a, si in zip(agree, s)])
    if not normalize:
        return num.astype(dtype)
    den = functools.reduce(jnp.add, [jnp.where(a, x, 0.0) for a, x in zip(agree, wm)])
    return jnp.where(den != 0, num / jnp.where(den != 0, den, 1.0), 0.0).astype(dtype)


# --- kernel ----------------------------------------------------------------------------------

def _ties_kernel(*refs, k: int, mode: str, normalize: bool):
    w_ref = refs[0]
    tk_ref = refs[1] if mode == "thresholds" else None
    first = 2 if mode == "thresholds" else 1
    tv_refs = refs[first:first + k]
    m_refs = refs[first + k:first + 2 * k] if mode == "masks" else None
    o_ref = refs[-1]

    s, wm = [], []
    for i in range(k):
        raw = tv_refs[i][...]
        w = w_ref[i]
        if mode == "thresholds":
            m = (C.abs_key(raw) >= tk_ref[i]).astype(jnp.float32)
        elif mode == "masks":
            m = m_refs[i][...].astype(jnp.float32)
        else:
            m = None
        tv = raw.astype(jnp.float32)
        s.append(w * tv if m is None else w * tv * m)
        wm.append(jnp.full(tv.shape, w, jnp.float32) if m is None else w * m)
    total = s[0]
    for si in s[1:]:
        total = total + si
    pos, neg, zero = total > 0, total < 0, total == 0
    num = jnp.zeros_like(total)
    den = jnp.zeros_like(total)
    for si, wmi in zip(s, wm):
        # sign(si) == sign(total) spelt with compares (cheaper, and Mosaic's sign rule needs
        # a TPU generation lookup)
        agree = jnp.where(si > 0, pos, jnp.where(si < 0, neg, zero))
        num = num + jnp.where(agree, si, 0.0)
        den = den + jnp.where(agree, wmi, 0.0)
    if normalize:
        nz = den != 0
        num = jnp.where(nz, num / jnp.where(nz, den, 1.0), 0.0)
    o_ref[...] = num.astype(o_ref.dtype)


def _operands(xs: Arrays, k: int, br: int):
    """(arrays, block specs) feeding K [br, LANES] blocks; a stacked array is passed K times."""
    if hasattr(xs, "ndim"):
        flat = xs.reshape(k, -1)
        pad = (-flat.shape[1]) % C.LANES
        if pad:
            flat = jnp.pad(flat, ((0, 0), (0, pad)))
        rows = flat.reshape(k, -1, C.LANES)
        specs = [pl.BlockSpec((None, br, C.LANES), lambda g, i=i: (i, g, 0)) for i in range(k)]
        return [rows] * k, specs
    return [C.as_rows(x) for x in xs], [C.row_block(br) for _ in range(k)]


_DEFAULT_ROWS = {"gpu": 16, "tpu": 256, "interpret": 64}


def ties_merge_kernel(tvs: Arrays, weights, *, masks: Arrays | None = None, thresholds=None,
                      normalize: bool = True, out_dtype=None, interpret: bool = False,
                      block_rows: int | None = None) -> jax.Array:
    k, shape = _check(tvs, weights, masks, thresholds)
    dtype = _out_dtype(tvs, out_dtype)
    n = 1
    for d in shape:
        n *= d
    C.check_size(n)
    where = C.target(interpret)
    rows = -(-n // C.LANES)
    br = C.block_rows(rows, block_rows or _DEFAULT_ROWS.get(where, 64), where)
    w = C.pad_scalars(jnp.asarray(weights, jnp.float32), 0.0)
    args, specs = [w], [C.scalars_block(w.shape[0], where)]
    mode = "none"
    if thresholds is not None:
        mode = "thresholds"
        tk = C.pad_scalars(threshold_keys(thresholds), 0)
        args.append(tk)
        specs.append(C.scalars_block(tk.shape[0], where))
    tv_args, tv_specs = _operands(tvs, k, br)
    args += tv_args
    specs += tv_specs
    if masks is not None:
        mode = "masks"
        if hasattr(masks, "ndim"):
            m = masks.astype(jnp.int8) if masks.dtype == jnp.bool_ else masks
        else:
            m = [x.astype(jnp.int8) if x.dtype == jnp.bool_ else x for x in masks]
        m_args, m_specs = _operands(m, k, br)
        args += m_args
        specs += m_specs
    out = pl.pallas_call(
        functools.partial(_ties_kernel, k=k, mode=mode, normalize=normalize),
        out_shape=jax.ShapeDtypeStruct((rows, C.LANES), dtype),
        grid=(pl.cdiv(rows, br),),
        in_specs=specs,
        out_specs=C.row_block(br),
        compiler_params=C.compiler_params(where),
        interpret=interpret,
        name="ties_merge",
    )(*args)
    return C.from_rows(out, shape)


def ties_merge(tvs: Arrays, weights, *, masks: Arrays | None = None, thresholds=None,
               normalize: bool = True, out_dtype=None, backend: str = "auto",
               interpret: bool = False, block_rows: int | None = None) -> jax.Array:
    """TIES elect + disjoint weighted mean of K task vectors; see the module docstring."""
    if C.use_kernel(backend, interpret):
        return ties_merge_kernel(tvs, weights, masks=masks, thresholds=thresholds,
                                 normalize=normalize, out_dtype=out_dtype, interpret=interpret,
                                 block_rows=block_rows)
    return ties_merge_reference(tvs, weights, masks=masks, thresholds=thresholds,
                                normalize=normalize, out_dtype=out_dtype)
