"""Task arithmetic (Ilharco et al., 2212.04089): theta_0 + lambda * sum_i w_i tau_i."""

from jmerge.merge._consensus import gta_merge, gta_params
from jmerge.merge.registry import FRACTION, register

PARAMS = gta_params(normalize=False, rescale=False)  # density is accepted and unused, as in mergekit


@register("task_arithmetic", model_params=PARAMS[0], global_params=PARAMS[1], elementwise=True,
          ranges={"density": FRACTION})
def task_arithmetic(base, models, *, key=None, **params):
    """theta_0 + lambda * sum_i w_i (theta_i - theta_0), divided by sum_i w_i if `normalize`."""
    return gta_merge("task_arithmetic", base, models, params, PARAMS)
