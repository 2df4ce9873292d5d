"""Model Breadcrumbs (Davari & Belilovsky, 2312.06795): drop outliers and small entries."""

import numpy as np

from jmerge.merge._consensus import gta_merge, gta_params
from jmerge.merge._sparsify import magnitude_outliers, mergekit_count
from jmerge.merge.registry import FRACTION, register

PARAMS = gta_params(normalize=False, rescale=False, gamma=0.01)


def crumbs(tv, i, p, key):
    counts = (p["density_k"][i], p["gamma_k"][i]) if "density_k" in p else None
    return magnitude_outliers(tv, p["density"][i], p["gamma"][i], p["rescale"], counts)


def crumb_counts(params: dict, n: int) -> dict:
    """The engine's host step for a planned merge: the entries kept and the outliers dropped out
    of n, exactly as mergekit counts them (the values are float32 once traced)."""
    return {f"{name}_k": tuple(np.int32(mergekit_count(x, n)) for x in params[name])
            for name in ("density", "gamma")}


@register("breadcrumbs", model_params=PARAMS[0], global_params=PARAMS[1],
          ranges={"density": FRACTION}, host_params=crumb_counts)
def breadcrumbs(base, models, *, key=None, **params):
    """Drop the top `gamma` fraction of |tau_i| and keep the next `density` fraction, then a
    weighted sum (divided by sum_i w_i if `normalize`), scaled by lambda."""
    return gta_merge("breadcrumbs", base, models, params, PARAMS, sparsify=crumbs)

