"""karcher: Riemannian (Karcher / Fréchet) mean of the unit-normalised tensors (mergekit
`karcher`)."""

import jax
import jax.numpy as jnp

from jmerge.merge._geometry import f32, result_dtype, safe_norm
from jmerge.merge.registry import register


@register("karcher", global_params={"max_iter": 10, "tol": 1e-5}, base="optional", min_models=1,
          static=("max_iter",))
def karcher(base, models, *, key=None, max_iter=10, tol=1e-5):
    """Equal-weight Karcher mean on the unit sphere, scaled by the mean of the input norms.

    Every input counts with weight 1/N, the base too when one is given (mergekit gathers the
    base like any other model here); per-model weights do not exist. Inputs with norm ≤ tol
    are left out of the direction but still count (with their norm) in the scale; all of them
    small gives zeros. `max_iter` is static (the loop length); `tol` may be traced.
    """
    tensors = ([base] if base is not None else []) + list(models)
    dtype = result_dtype(base, models)
    if len(tensors) == 1:
        return tensors[0]
    shape = jnp.shape(tensors[0])
    x = jnp.stack([f32(v).reshape(-1) for v in tensors])
    n = x.shape[0]
    norms = safe_norm(x, axis=-1)
    units = x / jnp.where(norms > 0, norms, 1.0)[:, None]
    valid = norms > tol
    alpha = jnp.where(valid, 1.0, 0.0)
    any_valid = jnp.any(valid)
    alpha = alpha / jnp.where(any_valid, jnp.sum(alpha), 1.0)

    guess = jnp.sum(units * alpha[:, None], axis=0)
    guess_norm = safe_norm(guess)
    first_valid = units[jnp.argmax(valid)]
    mean = jnp.where(guess_norm < tol, first_valid, guess / jnp.where(guess_norm > 0, guess_norm, 1.0))

    def step(_, carry):
        mean, done = carry
        dots = jnp.clip(units @ mean, -1.0, 1.0)
        moves = valid & (jnp.arccos(jax.lax.stop_gradient(dots)) >= tol)
        # arccos' infinite slope at ±1 must not leak into gradients of skipped inputs
        theta = jnp.arccos(jnp.where(moves, dots, 0.0))
        coef = jnp.where(moves, alpha * theta / jnp.sin(theta), 0.0)
        tangent = jnp.sum(coef[:, None] * (units - dots[:, None] * mean), axis=0)
        tn = safe_norm(tangent)
        done = done | (tn < tol)
        moved = jnp.cos(tn) * mean + jnp.sin(tn) * (tangent / jnp.where(tn > 0, tn, 1.0))
        mn = safe_norm(moved)
        moved = jnp.where(mn > tol, moved / jnp.where(mn > 0, mn, 1.0), moved)
        return jnp.where(done, mean, moved), done

    mean, _ = jax.lax.fori_loop(0, int(max_iter), step, (mean, jnp.asarray(False)))
    scale = jnp.sum(norms) / n
    out = jnp.where(any_valid, scale * mean, 0.0)
    return out.reshape(shape).astype(dtype)
