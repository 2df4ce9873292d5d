"""TIES-Merging (Yadav et al., 2306.01708), mergekit's per-tensor form."""

from jmerge.merge._consensus import gta_merge, gta_params
from jmerge.merge._sparsify import magnitudes
from jmerge.merge.registry import register

PARAMS = gta_params(normalize=True, rescale=False)


def trim(tvs, p):
    return magnitudes(tvs, p["density"], p["rescale"])


@register("ties", model_params=PARAMS[0], global_params=PARAMS[1])
def ties(base, models, *, key=None, **params):
    """Trim each task vector to its top-`density` magnitudes (per tensor, exactly k kept), elect
    the sign of sum_i w_i tau_i, take the disjoint weighted mean, scale by lambda."""
    return gta_merge("ties", base, models, params, PARAMS, sparsify_all=trim, consensus=True,
                     tv_as_pair=True)
