"""RESTA: restoring safety through task arithmetic (Bhardwaj et al., arXiv 2402.11746)."""

import jax

from jmerge.merge._consensus import require_key
from jmerge.merge._geometry import f32, result_dtype
from jmerge.merge._sparsify import bernoulli
from jmerge.merge.registry import FRACTION, Range, register

# The index of the safety model in `models`: DARE draws its mask from fold_in(key, SAFETY), the key
# dare_linear gives the same model, so a mask depends only on (seed, tensor name, model slot).
SAFETY = 1


@register("resta", global_params={"gamma": 1.0, "density": 1.0, "rescale": True}, base="required",
          min_models=2, max_models=2, stochastic=True,
          ranges={"gamma": Range(0, float("inf")), "density": FRACTION})
def resta(base, models, *, key=None, gamma=1.0, density=1.0, rescale=True):
    """θ = θ_ft + γ · DARE(τ_safety),  τ_safety = θ_aligned − θ_base.

    Roles: `base` = the unaligned reference, models[0] = the domain fine-tune θ_ft, models[1] = the
    safety-aligned model θ_aligned. DARE keeps each entry of τ_safety with probability `density`
    and, with `rescale`, restores its L1 norm (mergekit's DARE, as dare_linear; the paper divides
    by the density). density 1 adds the whole safety vector (the paper's plain RESTA). The paper
    adds the safety vector with weight 1 (γ = 1) and applies DARE to the fine-tune's delta; issue
    18 asks for DARE on the safety vector, which is what this does.
    """
    require_key("resta", key)
    tau = f32(models[SAFETY]) - f32(base)
    tau = bernoulli(tau, density, jax.random.fold_in(key, SAFETY), rescale)
    out = f32(models[0]) + f32(gamma) * tau
    return out.astype(result_dtype(base, models))
