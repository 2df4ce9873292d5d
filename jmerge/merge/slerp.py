"""slerp: spherical interpolation from the base to one other model (mergekit `slerp`)."""

from jmerge.merge._geometry import result_dtype, slerp_flat
from jmerge.merge.registry import register


@register("slerp", global_params={"t": None}, base="required", min_models=1, max_models=1)
def slerp(base, models, *, key=None, t):
    """Slerp over the whole flattened tensor: t=0 gives the base, t=1 the other model.

    The angle Ω is measured between the normalised tensors; when |cos Ω| > 0.9995 it falls back
    to lerp. `t` is required and may be traced (e.g. one value per layer under vmap).
    """
    v0, v1 = base, models[0]
    out = slerp_flat(t, v0.reshape(-1), v1.reshape(-1))
    return out.reshape(v0.shape).astype(result_dtype(base, models))
