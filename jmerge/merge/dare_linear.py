"""DARE (Yu et al., 2311.03099) drop-and-rescale, then a plain weighted sum."""

from jmerge.merge._consensus import gta_merge, gta_params, require_key
from jmerge.merge.dare_ties import drop
from jmerge.merge.registry import FRACTION, register

PARAMS = gta_params(normalize=False, rescale=True)


@register("dare_linear", model_params=PARAMS[0], global_params=PARAMS[1], stochastic=True,
          ranges={"density": FRACTION})
def dare_linear(base, models, *, key=None, **params):
    """Keep each task-vector entry with probability `density` (L1 norm restored if `rescale`),
    then theta_0 + lambda * sum_i w_i tau_i (divided by sum_i w_i if `normalize`)."""
    require_key("dare_linear", key)
    return gta_merge("dare_linear", base, models, params, PARAMS, sparsify=drop, key=key)
