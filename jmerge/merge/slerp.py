"""slerp: spherical interpolation from the base to one other model (mergekit `slerp`)."""

from jmerge.merge._geometry import result_dtype, slerp_flat
from jmerge.merge.registry import register


@register("slerp", global_params={"t": None}, base="required", min_models=1, max_models=1, pair=True)
def slerp(base, models, *, key=None, t):
    """Slerp over the whole flattened tensor: t=0 gives the base, t=1 the other model.

    The angle Ω is measured between the normalised tensors; when |cos Ω| > 0.9995 it falls back
    to lerp. `t` is required and may be traced (e.g. one value per layer under vmap).
    """
    v0, v1 = base, models[0]
    # In the tensor's own shape: reductions over every axis need no flattening, and a reshape
    # inside the fused output pass costs XLA:CPU a div/mod per entry.
    return slerp_flat(t, v0, v1).astype(result_dtype(base, models))
