"""nearswap: take the other model's value only where it is already close to the base (mergekit
`nearswap`)."""

import jax.numpy as jnp

from jmerge.merge._geometry import check, concrete, f32, result_dtype
from jmerge.merge.registry import register


@register("nearswap", global_params={"t": None}, base="required", min_models=1, max_models=1, pair=True)
def nearswap(base, models, *, key=None, t):
    """Per element w = clip(t / |θ_base − θ₁|, 0, 1) (w = 1 where they are equal);
    θ = w·θ₁ + (1−w)·θ_base. The threshold `t` is required and must be > 0 (checked when it is
    a literal; a traced t ≤ 0 just yields the base where the two differ).
    """
    tv = concrete(t)
    check(tv is None or tv > 0, f"nearswap: t must be > 0, got {tv}")
    v0, v1 = f32(base), f32(models[0])
    diff = jnp.abs(v0 - v1)
    w = jnp.nan_to_num(f32(t) / diff, nan=1.0, posinf=1.0, neginf=1.0)
    w = jnp.clip(w, 0.0, 1.0)
    return (w * v1 + (1 - w) * v0).astype(result_dtype(base, models))
