"""model_stock: move from the base toward the average of the fine-tuned models by a ratio set
by how aligned their task vectors are (Model Stock, arXiv 2403.19522; mergekit `model_stock`)."""

import itertools

import jax.numpy as jnp

from jmerge.merge._geometry import f32, result_dtype, safe_norm
from jmerge.merge.registry import register


@register("model_stock", global_params={"filter_wise": False}, base="required", min_models=2,
          static=("filter_wise",))
def model_stock(base, models, *, key=None, filter_wise=False):
    """c = mean over pairs of cos(τᵢ, τⱼ), τᵢ = θᵢ − θ_base; t = N·c / (1 + (N−1)·c);
    θ = t·mean(θᵢ) + (1−t)·θ_base.

    The cosine uses the whole flattened tensor, or each vector along the last axis with
    `filter_wise` (static; a 1-D tensor is then one row). Norm products are clamped at 1e-6 and
    cosines clipped to [−1, 1], as in mergekit.
    """
    w0 = f32(base)
    ws = [f32(m) for m in models]
    shape = w0.shape
    if filter_wise:
        if w0.ndim <= 1:
            w0, ws = w0.reshape(1, -1), [w.reshape(1, -1) for w in ws]
    else:
        w0, ws = w0.reshape(-1), [w.reshape(-1) for w in ws]
    offsets = [w - w0 for w in ws]
    cosines = []
    for a, b in itertools.combinations(offsets, 2):
        denom = jnp.maximum(safe_norm(a, axis=-1) * safe_norm(b, axis=-1), 1e-6)
        cosines.append(jnp.clip(jnp.sum(a * b, axis=-1) / denom, -1.0, 1.0))
    c = jnp.mean(jnp.stack(cosines), axis=0)[..., None]
    n = len(ws)
    t = n * c / (1 + (n - 1) * c)
    merged = t * (sum(ws) / n) + (1 - t) * w0
    return merged.reshape(shape).astype(result_dtype(base, models))
