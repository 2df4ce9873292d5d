"""fisher: Fisher-weighted averaging (Matena & Raffel, arXiv 2111.09832)."""

import jax.numpy as jnp

from jmerge.merge._geometry import check, f32, result_dtype
from jmerge.merge.registry import register

# Added to every Fisher value, as the paper's code does (fisher_floor): where all F are 0 the
# result is then the plain λ-weighted mean instead of 0/0.
EPS = 1e-8


# Not `elementwise`: the engine would merge such a tensor in pieces its Fisher file does not share.
@register("fisher", model_params={"fisher": None, "weight": 1.0}, base="none", min_models=1,
          paths=("fisher",), needs_data=True)
def fisher(base, models, *, key=None, fisher, weight=None):
    """θ = Σᵢ λᵢ (Fᵢ + ε) θᵢ / Σᵢ λᵢ (Fᵢ + ε), elementwise, ε = 1e-8.

    `fisher` (required, per model) is the diagonal Fisher of that model, an array of the tensor's
    shape (a safetensors file keyed by HF tensor name, or a directory holding fisher.safetensors).
    `weight` λᵢ defaults to 1. Where every Fᵢ is 0 the result is the λ-weighted mean.
    """
    weight = [1.0] * len(models) if weight is None else weight
    num = jnp.zeros(jnp.shape(models[0]), jnp.float32)
    den = jnp.zeros_like(num)
    for theta, f, lam in zip(models, fisher, weight):
        check(jnp.shape(f) == jnp.shape(theta), f"fisher: a Fisher array of shape {jnp.shape(f)} for a tensor "
              f"of shape {jnp.shape(theta)} (stats of another model?)")
        wf = f32(lam) * (f32(f) + EPS)
        num = num + wf * f32(theta)
        den = den + wf
    return (num / den).astype(result_dtype(None, models))
