"""passthrough: copy one model's tensor, optionally scaled (frankenmerges, layer stacking)."""

from jmerge.merge._geometry import f32, result_dtype
from jmerge.merge.registry import register


@register("passthrough", model_params={"scale": 1.0}, base="none", min_models=1, max_models=1, single_source=True,
          elementwise=True)
def passthrough(base, models, *, key=None, scale=(1.0,)):
    """θ = scale · θ₁ for the single input model; scale defaults to 1 (mergekit: unset = no scaling)."""
    return (f32(scale[0]) * f32(models[0])).astype(result_dtype(None, models))
