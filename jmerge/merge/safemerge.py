"""SafeMERGE: merge with the safety model only the layers that left the safety subspace
(Djuhera et al., arXiv 2503.17239)."""

import jax.numpy as jnp

from jmerge.errors import JmergeError
from jmerge.merge._geometry import f32, result_dtype
from jmerge.merge.registry import FRACTION, Range, register
from jmerge.merge.safe_lora import check_finite, fine_tune_delta, projection_cosine
from jmerge.merge.ties import ties

MERGES = ("linear", "ties")


def safemerge_layers(base, models, *, threshold=0.7, delta_from="base"):
    """Whether SafeMERGE merges this tensor (a bool scalar; vmapped over stacked layers, a bool
    per layer): cos(ΔW, C ΔW) < threshold, C = V Vᵀ / ‖V‖_F, V = θ_aligned − θ_base, ΔW the
    fine-tune's delta (see safe_lora). 1-D tensors are never merged (no subspace to measure)."""
    dw = fine_tune_delta("safemerge", base, models, delta_from)
    if dw.ndim != 2:
        return jnp.zeros((), bool)
    cos, _ = projection_cosine(f32(models[1]) - f32(base), dw)
    return cos < f32(threshold)


# No declared range on `weight`: ranges are checked by parameter name across methods, and other
# methods take weights outside [0, 1].
@register("safemerge", global_params={"threshold": 0.7, "weight": 0.5, "density": 1.0,
                                      "merge": "linear", "delta_from": "base"},
          base="required", min_models=2, max_models=2, static=("merge", "delta_from"),
          ranges={"threshold": Range(0, 1), "density": FRACTION})
def safemerge(base, models, *, key=None, threshold=0.7, weight=0.5, density=1.0, merge="linear",
              delta_from="base"):
    """θ = merge(θ_ft, θ_safe) where ρ = cos(ΔW, C ΔW) < threshold, else θ_ft, per HF tensor.

    Roles: `base` = the unaligned reference, models[0] = the domain fine-tune θ_ft, models[1] =
    the safety-aligned model θ_safe. ρ is Safe LoRA's projection similarity (see
    safemerge_layers, which returns the decision). `merge` (static): "linear" =
    w·θ_ft + (1 − w)·θ_safe; "ties" = TIES over the task vectors against the base with weights
    (w, 1 − w) and `density` (jmerge's ties). The paper's τ = 0.7 and w = 0.5 are the defaults.
    """
    if merge not in MERGES:
        raise JmergeError(f"safemerge: merge must be one of {', '.join(MERGES)}, not {merge!r}")
    check_finite("safemerge", base, *models)
    ft, safe = f32(models[0]), f32(models[1])
    w = f32(weight)
    if merge == "linear":
        merged = w * ft + (1 - w) * safe
    else:
        merged = f32(ties(base, list(models), weight=(w, 1 - w), density=(density, density)))
    decide = safemerge_layers(base, models, threshold=threshold, delta_from=delta_from)
    return jnp.where(decide, merged, ft).astype(result_dtype(base, models))
