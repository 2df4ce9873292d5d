"""DARE (Yu et al., 2311.03099) drop-and-rescale followed by TIES sign consensus."""

from jmerge.merge._consensus import gta_merge, gta_params, require_key
from jmerge.merge._sparsify import bernoulli
from jmerge.merge.registry import FRACTION, register

PARAMS = gta_params(normalize=False, rescale=True)


def drop(tv, i, p, key):
    return bernoulli(tv, p["density"][i], key, p["rescale"])


@register("dare_ties", model_params=PARAMS[0], global_params=PARAMS[1], stochastic=True,
          ranges={"density": FRACTION})
def dare_ties(base, models, *, key=None, **params):
    """Keep each task-vector entry with probability `density` (L1 norm restored if `rescale`),
    then TIES sign election and weighted sum (divided by the agreeing weights if `normalize`)."""
    require_key("dare_ties", key)
    return gta_merge("dare_ties", base, models, params, PARAMS, sparsify=drop, consensus=True,
                     key=key)
