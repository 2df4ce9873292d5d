"""Shared pieces of the interpolation / geometric merge methods.

Everything here is jnp, float32 inside, and safe to trace: parameter values never reach Python
control flow except through `concrete`, which only looks at values that are already known.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jmerge.errors import JmergeError

# mergekit's slerp switches to lerp above this |cos Ω|; "not recommended to alter".
DOT_THRESHOLD = 0.9995


def f32(x) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


def result_dtype(base, models: Sequence[Any]):
    """The dtype a method returns: the base's, or the first model's when there is no base."""
    return jnp.asarray(base if base is not None else models[0]).dtype


def concrete(x) -> float | None:
    """The Python value of `x` when it is known now, None when it is a tracer.

    Lets a method reject a bad literal parameter with a JmergeError without putting Python
    control flow on traced values.
    """
    try:
        return float(np.asarray(x))
    except (TypeError, jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def check(ok: bool | None, message: str) -> None:
    if ok is False:
        raise JmergeError(message)


def safe_norm(v: jax.Array, axis=None, keepdims: bool = False) -> jax.Array:
    """Euclidean norm whose gradient at 0 is 0 rather than NaN."""
    sq = jnp.sum(v * v, axis=axis, keepdims=keepdims)
    pos = sq > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)


def normalize_if_large(v: jax.Array, eps: float) -> jax.Array:
    """v/|v| when |v| > eps, else v unchanged (mergekit slerp's `normalize`)."""
    n = safe_norm(v)
    return jnp.where(n > eps, v / jnp.where(n > eps, n, 1.0), v)


def slerp_flat(t, v0: jax.Array, v1: jax.Array, dot_threshold: float = DOT_THRESHOLD,
               eps: float = 1e-8) -> jax.Array:
    """Spherical interpolation of two vectors treated as one flat direction each (mergekit slerp).

    The angle comes from the normalised vectors; the result combines the *unnormalised* inputs,
    so magnitudes interpolate too. Nearly (anti)parallel inputs fall back to lerp.
    """
    v0, v1 = f32(v0), f32(v1)
    dot = jnp.sum(normalize_if_large(v0, eps) * normalize_if_large(v1, eps))
    colinear = jnp.abs(dot) > dot_threshold
    # The slerp branch is computed everywhere; keep it finite where lerp is chosen so that
    # gradients through jnp.where stay clean.
    theta0 = jnp.arccos(jnp.clip(jnp.where(colinear, 0.0, dot), -1.0, 1.0))
    sin0 = jnp.sin(theta0)
    # The fallback chooses between scalar coefficients, never between two whole results: XLA:CPU
    # compiles a select of two tensors on one flag as a branch, and whether LLVM then contracts
    # the multiply-adds around it into FMAs depends on the rest of the program, so the stream and
    # in-memory merges would differ by an ulp.
    s0 = jnp.where(colinear, 1 - t, jnp.sin(theta0 - theta0 * t) / sin0)
    s1 = jnp.where(colinear, t, jnp.sin(theta0 * t) / sin0)
    return s0 * v0 + s1 * v1


def slerp_rows(t, v0: jax.Array, v1: jax.Array, eps: float = 1e-8) -> jax.Array:
    """Slerp of each vector along the last axis (mergekit nuslerp's kernel).

    Unlike `slerp_flat`, the lerp fallback triggers only when sin Ω < eps, and norms are clamped
    at 1e-7 before normalising.
    """
    v0, v1 = f32(v0), f32(v1)
    u0 = v0 / jnp.maximum(safe_norm(v0, axis=-1, keepdims=True), 1e-7)
    u1 = v1 / jnp.maximum(safe_norm(v1, axis=-1, keepdims=True), 1e-7)
    cos = jnp.clip(jnp.sum(u0 * u1, axis=-1, keepdims=True), -1.0, 1.0)
    colinear = jnp.abs(jnp.sin(jnp.arccos(jax.lax.stop_gradient(cos)))) < eps
    # arccos has an infinite slope at ±1: feed it a harmless value where lerp is chosen, so
    # gradients through the unused branch stay finite.
    theta = jnp.arccos(jnp.where(colinear, 0.0, cos))
    # Per-vector coefficients rather than a select of two whole results (see `slerp_flat`).
    s0 = jnp.where(colinear, 1 - t, jnp.sin((1 - t) * theta))
    s1 = jnp.where(colinear, t, jnp.sin(t * theta))
    return (s0 * v0 + s1 * v1) / jnp.where(colinear, 1.0, jnp.sin(theta))
