"""Model Breadcrumbs (Davari & Belilovsky, 2312.06795): drop outliers and small entries."""

from jmerge.merge._consensus import gta_merge, gta_params
from jmerge.merge._sparsify import magnitude_outliers
from jmerge.merge.registry import register

PARAMS = gta_params(normalize=False, rescale=False, gamma=0.01)


def crumbs(tv, i, p, key):
    return magnitude_outliers(tv, p["density"][i], p["gamma"][i], p["rescale"])


@register("breadcrumbs", model_params=PARAMS[0], global_params=PARAMS[1])
def breadcrumbs(base, models, *, key=None, **params):
    """Drop the top `gamma` fraction of |tau_i| and keep the next `density` fraction, then a
    weighted sum (divided by sum_i w_i if `normalize`), scaled by lambda."""
    return gta_merge("breadcrumbs", base, models, params, PARAMS, sparsify=crumbs)
