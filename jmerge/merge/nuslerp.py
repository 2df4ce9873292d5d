"""nuslerp: slerp driven by two model weights, flattened or per vector, optionally on task
vectors (mergekit `nuslerp`)."""

import jax.numpy as jnp

from jmerge.merge._geometry import f32, result_dtype, slerp_rows
from jmerge.merge.registry import register


@register("nuslerp", model_params={"weight": None},
          global_params={"nuslerp_flatten": True, "nuslerp_row_wise": False},
          base="optional", min_models=2, max_models=2, static=("nuslerp_flatten", "nuslerp_row_wise"))
def nuslerp(base, models, *, key=None, weight, nuslerp_flatten=True, nuslerp_row_wise=False):
    """Slerp θ₁ → θ₂ at t = w₂/(w₁+w₂) (t = 0.5 when |w₁+w₂| < 1e-6).

    With a base, the task vectors θᵢ − θ_base are slerped and the base added back.
    `nuslerp_flatten` (default true) treats the tensor as one vector. Otherwise each vector along
    the last axis is slerped separately, or along axis 0 with `nuslerp_row_wise` (mergekit's
    naming: "row_wise" transposes dim 0 to the end). Both flags are static.
    """
    w1, w2 = f32(weight[0]), f32(weight[1])
    total = w1 + w2
    small = jnp.abs(total) < 1e-6
    t = jnp.where(small, 0.5, w2 / jnp.where(small, 1.0, total))

    v0, v1 = f32(models[0]), f32(models[1])
    if base is not None:
        v0, v1 = v0 - f32(base), v1 - f32(base)
    shape = v0.shape
    if nuslerp_flatten or v0.ndim == 0:
        out = slerp_rows(t, v0.reshape(-1), v1.reshape(-1)).reshape(shape)
    elif nuslerp_row_wise:
        out = jnp.swapaxes(slerp_rows(t, jnp.swapaxes(v0, 0, -1), jnp.swapaxes(v1, 0, -1)), 0, -1)
    else:
        out = slerp_rows(t, v0, v1)
    if base is not None:
        out = out + f32(base)
    return out.astype(result_dtype(base, models))
