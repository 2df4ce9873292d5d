"""Shared plumbing for the Pallas kernels: backend choice, the [rows, 128] view, block specs.

Every kernel sees its tensor flattened and viewed as [rows, LANES] (row-major, so element
(r, c) is flat index r*LANES + c). The view is free when the size is a multiple of LANES; other
sizes are zero-padded (a copy, but in LLM checkpoints only small vectors such as norms have such
sizes). Kernels mask by flat index, so padding and ragged edge blocks never leak into results.

GPU kernels are lowered through the Triton backend (explicit `CompilerParams`): these kernels
are simple blocked elementwise/reduction loops, which Triton runs on Ampere and newer, while the
default Mosaic GPU path needs Hopper and is being moved to `plgpu.kernel`.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jmerge.errors import JmergeError

LANES = 128
BACKENDS = ("auto", "pallas", "reference")
MAX_ELEMENTS = 2**31 - 1  # flat indices and per-tensor counts are int32


def use_kernel(backend: str, interpret: bool) -> bool:
    """True when the dispatcher should run the Pallas kernel rather than the jnp reference."""
    if backend not in BACKENDS:
        raise JmergeError(f"unknown kernel backend {backend!r}; expected one of {BACKENDS}")
    if backend == "reference":
        return False
    if interpret:
        return True
    platform = jax.default_backend()
    if backend == "pallas" and platform not in ("gpu", "tpu"):
        raise JmergeError(f"Pallas kernels need a GPU or TPU (this is {platform}); "
                          "pass interpret=True or backend='reference'")
    return platform in ("gpu", "tpu")


def target(interpret: bool) -> str:
    """'interpret', 'gpu' or 'tpu': what the block shapes and compiler params are chosen for."""
    return "interpret" if interpret else jax.default_backend()


def check_size(n: int) -> None:
    if n > MAX_ELEMENTS:
        raise JmergeError(f"tensor has {n} elements; kernels count and index in int32 "
                          f"(at most {MAX_ELEMENTS}); split the tensor first")


def as_rows(x: jax.Array) -> jax.Array:
    """Flatten x to [ceil(n / LANES), LANES], zero-padding the tail when needed."""
    flat = x.reshape(-1)
    pad = (-flat.size) % LANES
    if pad:
        flat = jnp.pad(flat, (0, pad))
    return flat.reshape(-1, LANES)


def from_rows(y: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    n = math.prod(shape)
    flat = y.reshape(-1)
    if flat.size != n:
        flat = flat[:n]
    return flat.reshape(shape)


def block_rows(rows: int, requested: int, where: str) -> int:
    """Rows per block. Triton needs power-of-two blocks; Mosaic TPU needs a multiple of 32
    (covers f32/bf16/int8 tiling) or the full dimension."""
    requested = max(1, int(requested))
    if where == "gpu":
        return pl.next_power_of_2(min(requested, rows))
    if where == "tpu":
        if rows <= requested:
            return rows
        return max(32, requested // 32 * 32)
    return min(requested, rows)


def row_block(br: int, extra_leading: int = 0) -> pl.BlockSpec:
    """BlockSpec for a [..., rows, LANES] operand walked along rows by grid axis 0."""
    lead = (None,) * extra_leading
    return pl.BlockSpec(lead + (br, LANES), lambda i: (0,) * extra_leading + (i, 0))


def scalars_block(n: int, where: str) -> pl.BlockSpec:
    """A small 1-D vector read element by element (thresholds, weights, seeds)."""
    if where == "tpu":
        from jax.experimental.pallas import tpu as pltpu
        return pl.BlockSpec(memory_space=pltpu.SMEM)
    return pl.BlockSpec((n,), lambda i: (0,))


def pad_scalars(v: jax.Array, fill: Any) -> jax.Array:
    """Pad a 1-D vector to a power-of-two length (Triton block shapes must be powers of two)."""
    n = v.shape[0]
    m = pl.next_power_of_2(n)
    return v if m == n else jnp.concatenate([v, jnp.full((m - n,), fill, v.dtype)])


def compiler_params(where: str) -> Any:
    if where == "gpu":
        from jax.experimental.pallas import triton as pltriton
        return pltriton.CompilerParams(num_warps=4)
    if where == "tpu":
        from jax.experimental.pallas import tpu as pltpu
        return pltpu.CompilerParams(dimension_semantics=("parallel",))
    return None


def valid_mask(n: int, br: int) -> jax.Array:
    """Inside a kernel: True for block elements whose flat index is < n (not padding/edge)."""
    row = jax.lax.broadcasted_iota(jnp.int32, (br, LANES), 0)
    col = jax.lax.broadcasted_iota(jnp.int32, (br, LANES), 1)
    return (pl.program_id(0) * br + row) * LANES + col < n


def flat_index(br: int) -> jax.Array:
    """Inside a kernel: the flat element index of each block element."""
    row = jax.lax.broadcasted_iota(jnp.int32, (br, LANES), 0)
    col = jax.lax.broadcasted_iota(jnp.int32, (br, LANES), 1)
    return (pl.program_id(0) * br + row) * LANES + col


def abs_key(x: jax.Array) -> jax.Array:
    """int32 bit pattern of |x| as float32, in [0, 2**31): monotone in |x| (NaN sorts above
    +inf). Clearing the sign bit rather than calling abs keeps denormals exact under FTZ."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
    return bits & jnp.int32(0x7FFFFFFF)
