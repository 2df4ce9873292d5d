"""DELLA (2406.11617) magnitude-ranked random drop without sign consensus."""

from jmerge.merge._consensus import gta_merge, gta_params, require_key
from jmerge.merge.della import check_epsilon, magprune
from jmerge.merge.registry import FRACTION, register

PARAMS = gta_params(normalize=False, rescale=True, epsilon=0.15)


@register("della_linear", model_params=PARAMS[0], global_params=PARAMS[1], stochastic=True,
          ranges={"density": FRACTION})
def della_linear(base, models, *, key=None, **params):
    """DELLA's rank-based drop and L1 rescale, then a weighted sum (divided by sum_i w_i if
    `normalize`), scaled by lambda."""
    require_key("della_linear", key)
    check_epsilon("della_linear", params, len(models))
    return gta_merge("della_linear", base, models, params, PARAMS, sparsify=magprune, key=key)
