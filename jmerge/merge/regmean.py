"""regmean: Regression Mean (Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language
Models", arXiv 2212.09849), from given Gram matrices of each linear layer's inputs."""

import jax.numpy as jnp

from jmerge.merge._geometry import check, concrete, f32, result_dtype
from jmerge.merge.registry import register

# Relative Tikhonov ridge (see the docstring). Below float32's rounding (6e-8) of a diagonal entry
# near the mean, so it barely moves a well-posed solve (1e-6 moved the paper's W* by ~1e-6 x
# cond(Σ G̃)); in a direction no data reaches it is all there is.
RIDGE = 1e-8


def check_settings(alpha, weight) -> None:
    """One-line errors for values known now. Not a registry Range on alpha: ranges are checked by
    parameter name across methods, and mergealign's and ramplus_tl's alpha go beyond 1."""
    a = concrete(alpha)
    check(a is None or 0.0 <= a <= 1.0, f"regmean: alpha must be in [0, 1], got {a}")
    s = concrete(sum(f32(w) for w in weight))
    check(s is None or s != 0.0, f"regmean: the weights {list(weight)} sum to 0")


def host_check(params: dict, n: int) -> dict:
    # The engine traces alpha and the weights; this runs on the planned values before any merge.
    check_settings(params["alpha"], params["weight"])
    return {}


# Not `elementwise`: an output entry depends on its whole row and the whole Gram, which the
# engine must not split.
@register("regmean", model_params={"grams": None, "weight": 1.0}, global_params={"alpha": 0.9},
          base="none", min_models=1, paths=("grams",), optional_paths=("grams",), needs_data=True,
          host_params=host_check)
def regmean(base, models, *, key=None, grams=None, weight=None, alpha=0.9):
    """W* = (Σᵢ λᵢ Wᵢ G̃ᵢ)(Σᵢ λᵢ G̃ᵢ)⁻¹, G̃ᵢ = α Gᵢ + (1 − α) diag(Gᵢ), for a linear weight Wᵢ
    [out, in] (HF layout, y = x Wᵀ): the W minimising Σᵢ λᵢ ‖Xᵢ Wᵀ − Xᵢ Wᵢᵀ‖² when α = 1.

    `grams` (per model) is Gᵢ = XᵢᵀXᵢ [in, in], the Gram matrix of that linear's inputs on model
    i's data (a safetensors file keyed by HF tensor name, or a directory holding
    grams.safetensors). A tensor the files lack (norms, embeddings, lm_head: the paper averages
    them) arrives as None and gets the λ-weighted mean. `alpha` (global, default 0.9, in [0, 1])
    shrinks the off-diagonal entries. `weight` λᵢ defaults to 1 (the paper: no weights).

    Ridge: every G̃ᵢ gets ε·I added, ε = 1e-8 · mean diag(Σ λ G̃) / Σ λ. A direction no model's
    data reaches (a dead input feature, all-zero inputs) makes Σ G̃ singular; there the ridge
    pulls W* to the λ-weighted mean, as fisher's ε does, instead of a 0/0 that cannot be refused
    under jit. Elsewhere it is mostly lost in float32 rounding. (With α < 1, G̃ᵢ ⪰ (1 − α) diag Gᵢ,
    so only dead features make Σ G̃ singular; α = 1 on rank-deficient Grams is ill-posed, and
    gives finite but data-unconstrained values there.) Solved in float32, never inverted.
    """
    n = len(models)
    weight = [1.0] * n if weight is None else weight
    grams = [None] * n if grams is None else grams
    check(isinstance(grams, (list, tuple)) and len(grams) == n,
          f"regmean: 'grams' needs one array per model ({n})")
    check_settings(alpha, weight)
    lam = [f32(w) for w in weight]
    present = [g is not None for g in grams]
    if not any(present):
        mean = sum(w * f32(x) for w, x in zip(lam, models)) / sum(lam)
        return mean.astype(result_dtype(None, models))
    check(all(present), "regmean: a Gram matrix for some models and not others (one per model or none)")
    shape = jnp.shape(models[0])
    d = shape[-1]
    for g in grams:
        check(len(shape) == 2 and jnp.shape(g) == (d, d),
              f"regmean: a Gram matrix of shape {jnp.shape(g)} for a tensor of shape {shape} "
              f"(needs [in, in] for a weight [out, in]; stats of another model?)")
    eye = jnp.eye(d, dtype=bool)
    a = f32(alpha)
    # ε from the diagonal of Σ λ G̃, which is Σ λ G: G̃ keeps G's diagonal. All zero: scale 1.
    s = jnp.mean(sum(w * jnp.diagonal(f32(g)) for w, g in zip(lam, grams)))
    eps = RIDGE * jnp.where(s > 0, s, 1.0) / sum(lam)
    num = jnp.zeros(shape, jnp.float32)
    den = jnp.zeros((d, d), jnp.float32)
    for w, x, g in zip(lam, models, grams):
        # λ(G̃ + εI): α off the diagonal, the diagonal kept (α G + (1 − α) diag G), plus ε. The
        # ridge goes into the matrices rather than a later `+ ε·mean`: XLA:CPU contracted that
        # multiply-add into an FMA in one merge mode and not the other (1 ulp apart).
        m = jnp.where(eye, w * (f32(g) + eps), w * a * f32(g))
        num = num + f32(x) @ m
        den = den + m
    # W* den = num, i.e. denᵀ W*ᵀ = numᵀ (den is symmetric up to rounding in the given Grams).
    out = jnp.linalg.solve(den.T, num.T).T
    return out.astype(result_dtype(None, models))
