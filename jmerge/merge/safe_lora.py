"""Safe LoRA: project fine-tuning updates onto the alignment subspace (Hsu et al., arXiv 2405.16833)."""

import jax.numpy as jnp
import numpy as np

from jmerge.errors import JmergeError
from jmerge.merge._geometry import f32, result_dtype
from jmerge.merge.registry import Range, register

DELTA_FROM = ("base", "aligned")


def check_finite(method: str, *arrays) -> None:
    """JmergeError when a concrete input is not finite. Traced inputs (the engine jits every
    method) cannot be checked here: their NaN then flows into the similarity and the output."""
    for a in arrays:
        if isinstance(a, np.ndarray) and a.dtype.kind == "f" and not np.isfinite(a).all():
            raise JmergeError(f"{method}: non-finite weights where a norm is taken")


def fine_tune_delta(method: str, base, models, delta_from: str):
    """ΔW of the domain fine-tune: against the base (both experts fine-tuned from it, the testbed)
    or against the aligned model (the fine-tune started from it, the Safe LoRA paper)."""
    if delta_from not in DELTA_FROM:
        raise JmergeError(f"{method}: delta_from must be one of {', '.join(DELTA_FROM)}, not {delta_from!r}")
    ref = base if delta_from == "base" else models[1]
    return f32(models[0]) - f32(ref)


def project(v, dw):
    """C ΔW with C = V Vᵀ / ‖V‖_F, through the smaller side of V (never a d_out × d_out matrix
    when d_in is smaller); 0 when V = 0."""
    d_out, d_in = v.shape
    vv = jnp.sum(v * v)
    norm = jnp.sqrt(jnp.where(vv > 0, vv, 1.0))
    cdw = v @ (v.T @ dw) if d_in <= d_out else (v @ v.T) @ dw
    return jnp.where(vv > 0, cdw / norm, 0.0)


def projection_cosine(v, dw):
    """(cos(ΔW, C ΔW), C ΔW) for one 2-D tensor; the cosine is 1 when V = 0 or ΔW = 0 (nothing
    to project onto, or nothing to project: the update is kept as it is)."""
    cdw = project(v, dw)
    num = jnp.sum(dw * cdw)
    den = jnp.sqrt(jnp.sum(dw * dw) * jnp.sum(cdw * cdw))
    ok = den > 0
    return jnp.where(ok, num / jnp.where(ok, den, 1.0), 1.0), cdw


@register("safe_lora", global_params={"threshold": 0.5, "delta_from": "base"}, base="required",
          min_models=2, max_models=2, static=("delta_from",), ranges={"threshold": Range(0, 1)})
def safe_lora(base, models, *, key=None, threshold=0.5, delta_from="base"):
    """θ = θ_aligned + ΔW',  ΔW' = C ΔW if cos(ΔW, C ΔW) < threshold else ΔW,
    C = V Vᵀ / ‖V‖_F,  V = θ_aligned − θ_base,  per HF tensor (per layer: the engine vmaps it).

    Roles: `base` = the unaligned reference, models[0] = the domain fine-tune, models[1] = the
    safety-aligned model. `delta_from` (static): ΔW = θ_ft − θ_base ("base", the testbed, both
    fine-tuned from the base) or θ_ft − θ_aligned ("aligned", the paper's LoRA on the aligned
    model). ⟨ΔW, C ΔW⟩ = ‖Vᵀ ΔW‖² / ‖V‖_F ≥ 0, so the cosine lies in [0, 1]: threshold 0 projects
    nothing, threshold 1 every tensor whose cosine is below 1. The paper projects only the LoRA
    targets; here every 2-D tensor is projected, the embeddings and lm_head included (a method
    does not see tensor names). 1-D tensors (norms, biases) keep ΔW. V = 0 keeps ΔW.
    """
    check_finite("safe_lora", base, *models)
    dw = fine_tune_delta("safe_lora", base, models, delta_from)
    aligned = f32(models[1])
    if dw.ndim == 2:
        cos, cdw = projection_cosine(aligned - f32(base), dw)
        dw = jnp.where(cos < f32(threshold), cdw, dw)
    return (aligned + dw).astype(result_dtype(base, models))
