"""mergealign: base + α·domain vector + β·alignment vector (MergeAlign, arXiv 2411.06824)."""

from jmerge.merge._geometry import f32, result_dtype
from jmerge.merge.registry import register


@register("mergealign", global_params={"alpha": 0.5, "beta": 0.5}, base="required",
          min_models=2, max_models=2, elementwise=True)
def mergealign(base, models, *, key=None, alpha=0.5, beta=0.5):
    """θ = θ_base + α·(θ_domain − θ_base) + β·(θ_instruct − θ_base).

    models = [domain expert, aligned/instruct model], both fine-tuned from the base. With
    α + β = 1 this is α·θ_domain + (1−α)·θ_instruct. α and β are global and may be traced.
    """
    b = f32(base)
    dom, inst = f32(models[0]), f32(models[1])
    out = b + f32(alpha) * (dom - b) + f32(beta) * (inst - b)
    return out.astype(result_dtype(base, models))
