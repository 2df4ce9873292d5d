"""multislerp: barycentric interpolation of several models on the hypersphere (mergekit
`multislerp`)."""

import jax.numpy as jnp

from jmerge.merge._geometry import f32, result_dtype, safe_norm
from jmerge.merge.registry import register


@register("multislerp", model_params={"weight": None},
          global_params={"normalize_weights": True, "eps": 1e-8}, base="optional", min_models=1,
          normalize_flag="normalize_weights", divides_by_sum=True)
def multislerp(base, models, *, key=None, weight, normalize_weights=True, eps=1e-8):
    """Weighted mean direction of the unit-normalised (task) vectors, mapped back through the
    tangent space at that mean and rescaled by the weighted mean of the input norms.

    With a base, it works on θᵢ − θ_base and adds the base back. If the weighted sum of unit
    vectors vanishes (|mean| < eps) it returns the weighted linear combination: mergekit does
    this for two models and raises for more; a traced value cannot raise, so jmerge falls back
    to linear for any count. `normalize_weights` may be traced (0/1).
    """
    if len(models) == 1:
        return models[0]
    x = jnp.stack([f32(m) for m in models])
    if base is not None:
        x = x - f32(base)
    flat = x.reshape(x.shape[0], -1)
    w = jnp.stack([f32(v) for v in weight])
    w = jnp.where(jnp.asarray(normalize_weights, bool), w / jnp.sum(w), w)

    norms = safe_norm(flat, axis=-1, keepdims=True)
    units = flat / (norms + eps)
    mean = jnp.sum(units * w[:, None], axis=0)
    mean_norm = safe_norm(mean)
    degenerate = mean_norm < eps
    mean = mean / jnp.where(degenerate, 1.0, mean_norm)

    dots = jnp.sum(units * mean, axis=-1, keepdims=True)
    tangent = jnp.sum((units - dots * mean) * w[:, None], axis=0)
    tn = safe_norm(tangent) + eps
    on_sphere = mean * jnp.cos(tn) + tangent * (jnp.sin(tn) / tn)
    out = on_sphere * jnp.sum(norms[:, 0] * w)

    out = jnp.where(degenerate, jnp.tensordot(w, flat, axes=1), out).reshape(x.shape[1:])
    if base is not None:
        out = out + f32(base)
    return out.astype(result_dtype(base, models))
