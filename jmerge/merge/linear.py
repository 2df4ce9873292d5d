"""linear: weighted average of whole models (Model Soups; mergekit `linear`)."""

import jax.numpy as jnp

from jmerge.merge._geometry import check, concrete, f32, result_dtype
from jmerge.merge.registry import register


@register("linear", model_params={"weight": None}, global_params={"normalize": True}, base="none", elementwise=True,
          divides_by_sum=True)
def linear(base, models, *, key=None, weight, normalize=True):
    """θ = Σ wᵢ θᵢ, divided by Σ wᵢ when `normalize` (true by default). `weight` is required.

    `normalize` may be traced (a 0/1 scalar). A base model, if the config names one, is not
    special here: the engine passes it as one more entry of `models`, as mergekit does.
    """
    w = jnp.stack([f32(x) for x in weight])
    total = jnp.sum(w)
    s = concrete(total)
    n = concrete(normalize)
    check(not (s == 0.0 and n), "linear: the weights sum to 0, so `normalize: true` would divide by 0")
    stacked = jnp.stack([f32(m) for m in models])
    res = jnp.tensordot(w, stacked, axes=1)
    res = jnp.where(jnp.asarray(normalize, bool), res / jnp.where(total == 0, 1.0, total), res)
    return res.astype(result_dtype(None, models))
