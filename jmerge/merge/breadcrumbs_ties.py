"""Model Breadcrumbs (2312.06795) followed by TIES sign consensus."""

from jmerge.merge._consensus import gta_merge, gta_params
from jmerge.merge.breadcrumbs import crumb_counts, crumbs
from jmerge.merge.registry import FRACTION, register

PARAMS = gta_params(normalize=False, rescale=False, gamma=0.01)


@register("breadcrumbs_ties", model_params=PARAMS[0], global_params=PARAMS[1],
          ranges={"density": FRACTION}, host_params=crumb_counts)
def breadcrumbs_ties(base, models, *, key=None, **params):
    """Breadcrumbs trimming, then TIES sign election and sum over agreeing models (divided by
    their weights if `normalize`), scaled by lambda."""
    return gta_merge("breadcrumbs_ties", base, models, params, PARAMS, sparsify=crumbs,
                     consensus=True)

