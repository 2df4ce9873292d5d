"""somf: fuse task vectors through given masks, rescaled by the mask mean (SOMF, arXiv
2405.09055)."""

import jax.numpy as jnp

from jmerge.merge._geometry import f32, result_dtype
from jmerge.merge.registry import register


@register("somf", model_params={"mask": None, "weight": 1.0}, base="required", min_models=1,
          paths=("mask",), needs_data=True)
def somf(base, models, *, key=None, mask, weight=None):
    """θ = θ_safe + Σₖ λₖ·(τₖ ⊙ mₖ) / mean(mₖ), τₖ = θₖ − θ_safe, the mean over the whole tensor.

    The base is the safety-aligned model. `mask` (required, per model) is an array of the
    tensor's shape, soft in [0, 1] or binary (bool is fine); learning it belongs to `search`.
    A mask whose mean is 0 contributes nothing. `weight` λₖ defaults to 1 (the SOMF code uses
    0.3 when it fuses several task vectors by task arithmetic).
    """
    b = f32(base)
    weight = [1.0] * len(models) if weight is None else weight
    out = b
    for theta, m, lam in zip(models, mask, weight):
        m = f32(m)
        mean = jnp.mean(m)
        scale = jnp.where(mean == 0, 0.0, f32(lam) / jnp.where(mean == 0, 1.0, mean))
        out = out + (f32(theta) - b) * m * scale
    return out.astype(result_dtype(base, models))
