"""TIES-Merging (Yadav et al., 2306.01708), mergekit's per-tensor form."""

import numpy as np

from jmerge.merge._consensus import gta_merge, gta_params
from jmerge.merge._sparsify import magnitudes, mergekit_k
from jmerge.merge.registry import FRACTION, register

PARAMS = gta_params(normalize=True, rescale=False)


def trim(tvs, p):
    return magnitudes(tvs, p["density"], p["rescale"], p.get("density_k"))


def kept_counts(params: dict, n: int) -> dict:
    """The engine's host step for a planned merge: the entries each density keeps out of n,
    exactly as mergekit counts them (the densities are float32 once traced)."""
    return {"density_k": tuple(np.int32(mergekit_k(d, n)) for d in params["density"])}


@register("ties", model_params=PARAMS[0], global_params=PARAMS[1],
          ranges={"density": FRACTION}, host_params=kept_counts)
def ties(base, models, *, key=None, **params):
    """Trim each task vector to its top-`density` magnitudes (per tensor, exactly k kept), elect
    the sign of sum_i w_i tau_i, take the disjoint weighted mean, scale by lambda."""
    return gta_merge("ties", base, models, params, PARAMS, sparsify_all=trim, consensus=True,
                     tv_as_pair=True)

