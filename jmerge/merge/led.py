"""LED-Merging: Locate, Elect, Disjoint (Ma et al., arXiv 2502.16770)."""

import jax.numpy as jnp

from jmerge.errors import JmergeError
from jmerge.merge._consensus import per_model
from jmerge.merge._geometry import f32, result_dtype
from jmerge.merge._sparsify import topk_mask
from jmerge.merge.registry import FRACTION, register


def led_masks(scores, base_scores, density):
    """Per model i the disjoint mask: elected E_i = top_{r_i}(S(θ_i)) ∩ top_{r_i}(S(θ_base)), then
    M_i = E_i minus every E_j, j ≠ i (entries claimed by two tasks or more go to none)."""
    elected = [topk_mask(f32(s), r) & topk_mask(f32(b), r) for s, b, r in zip(scores, base_scores, density)]
    claims = sum(e.astype(jnp.int32) for e in elected)
    return [e & (claims == 1) for e in elected]


def score_lists(value, n: int, name: str) -> list:
    """One score array per model (never split along an axis of a single array)."""
    if not isinstance(value, (list, tuple)) or len(value) != n:
        raise JmergeError(f"led: {name!r} needs one array per model ({n})")
    return list(value)


@register("led", model_params={"scores": None, "base_scores": None, "weight": 1.0, "density": 0.1},
          base="required", min_models=1, paths=("scores", "base_scores"), needs_data=True,
          ranges={"density": FRACTION})
def led(base, models, *, key=None, scores, base_scores, weight=None, density=None):
    """θ = θ_base + Σᵢ λᵢ · (Mᵢ ⊙ τᵢ),  τᵢ = θᵢ − θ_base, Mᵢ from led_masks.

    Locate: `scores` (per model) is the SNIP importance |θᵢ ⊙ ∂Lᵢ/∂θᵢ| of fine-tuned model i on
    its task's data, `base_scores` (per model) that of the base on the same data; arrays of the
    tensor's shape (safetensors files keyed by HF tensor name, float32). Elect: the entries in the
    top `density` rᵢ fraction of both (per tensor, ties to the lowest flat index). Disjoint: drop
    entries elected by more than one model. Roles: `base` = the unaligned reference, models[0] =
    the domain fine-tune, models[1] = the safety-aligned model (any number of models works).
    """
    n = len(models)
    weight = per_model(weight if weight is not None else 1.0, n, "weight", "led")
    density = per_model(density if density is not None else 0.1, n, "density", "led")
    scores, base_scores = score_lists(scores, n, "scores"), score_lists(base_scores, n, "base_scores")
    b = f32(base)
    out = b
    for theta, m, lam in zip(models, led_masks(scores, base_scores, density), weight):
        out = out + f32(lam) * jnp.where(m, f32(theta) - b, 0.0)
    return out.astype(result_dtype(base, models))
