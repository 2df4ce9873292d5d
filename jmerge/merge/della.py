"""DELLA-Merging (Deep et al., 2406.11617): magnitude-ranked random drop + TIES consensus."""

from jmerge.errors import JmergeError
from jmerge.merge._consensus import gta_merge, gta_params, per_model, require_key
from jmerge.merge._geometry import concrete
from jmerge.merge._sparsify import della_magprune
from jmerge.merge.registry import FRACTION, register

PARAMS = gta_params(normalize=True, rescale=True, epsilon=0.15)


def check_epsilon(method, params, n_models):
    """mergekit rejects density +- epsilon outside (0, 1); checked here when the values are known
    (traced values pass through, and the probabilities are then used as they are)."""
    dens = per_model(params.get("density", 1.0), n_models, "density", method)
    eps = per_model(params.get("epsilon", 0.15), n_models, "epsilon", method)
    for d, e in zip(map(concrete, dens), map(concrete, eps)):
        if d is None or e is None or d >= 1 or d <= 0:
            continue
        if not (0 < d - e and d + e < 1):
            raise JmergeError(f"{method}: density {d:g} +- epsilon {e:g} must lie in (0, 1)")


def magprune(tv, i, p, key):
    return della_magprune(tv, p["density"][i], p["epsilon"][i], key, p["rescale"])


@register("della", model_params=PARAMS[0], global_params=PARAMS[1], stochastic=True,
          ranges={"density": FRACTION})
def della(base, models, *, key=None, **params):
    """Per row, keep entries with probability rising with |tau| rank from density - epsilon to
    density + epsilon (L1 norm restored if `rescale`), then TIES sign election and disjoint
    weighted mean (if `normalize`), scaled by lambda."""
    require_key("della", key)
    check_epsilon("della", params, len(models))
    return gta_merge("della", base, models, params, PARAMS, sparsify=magprune, consensus=True,
                     key=key)
