"""Golden tests for the interpolation / geometric merge methods.

Expected values are derived by hand or by small float64 numpy transcriptions of the published
formulas written here; none of them calls jmerge. Every method is also run under jax.jit with its
parameters as traced arguments (only structural options are static).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmerge.errors import JmergeError
from jmerge.merge import get

R2 = 1 / math.sqrt(2)
ATOL = 2e-6


@functools.lru_cache(maxsize=None)
def _jitted(name, static):
    fn = get(name).fn

    def run(base, models, params):
        return fn(base, models, key=None, **params, **dict(static))
    return jax.jit(run)


def merge(name, base, models, static=(), **params):
    """Call a method through jax.jit with base, models and every non-static parameter traced."""
    base = None if base is None else jnp.asarray(base, jnp.float32)
    models = [jnp.asarray(m, jnp.float32) for m in models]
    params = {k: (tuple(jnp.asarray(x, jnp.float32) for x in v) if isinstance(v, (list, tuple))
                  else jnp.asarray(v, jnp.float32)) for k, v in params.items()}
    return np.asarray(_jitted(name, tuple(sorted(static))) (base, models, params))


def close(got, want, atol=ATOL):
    np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want, np.float64),
                               atol=atol, rtol=1e-5)


# ---- independent numpy oracles (float64) -----------------------------------------------------

def np_slerp(t, v0, v1, thr=0.9995, eps=1e-8):
    v0, v1 = np.asarray(v0, np.float64).ravel(), np.asarray(v1, np.float64).ravel()
    n0, n1 = np.linalg.norm(v0), np.linalg.norm(v1)
    u0 = v0 / n0 if n0 > eps else v0
    u1 = v1 / n1 if n1 > eps else v1
    d = float(u0 @ u1)
    if abs(d) > thr:
        return (1 - t) * v0 + t * v1
    om = math.acos(d)
    return (math.sin((1 - t) * om) * v0 + math.sin(t * om) * v1) / math.sin(om)


def np_slerp_vec(t, a, b):
    """nuslerp kernel on one vector: sin-threshold fallback, norms clamped at 1e-7."""
    ua = a / max(np.linalg.norm(a), 1e-7)
    ub = b / max(np.linalg.norm(b), 1e-7)
    th = math.acos(min(1.0, max(-1.0, float(ua @ ub))))
    if abs(math.sin(th)) < 1e-8:
        return (1 - t) * a + t * b
    return (math.sin((1 - t) * th) * a + math.sin(t * th) * b) / math.sin(th)


def np_multislerp(xs, w, base=None, normalize=True, eps=1e-8):
    xs = [np.asarray(x, np.float64).ravel() for x in xs]
    if base is not None:
        xs = [x - np.ravel(base) for x in xs]
    w = np.asarray(w, np.float64)
    w = w / w.sum() if normalize else w
    norms = np.array([np.linalg.norm(x) for x in xs])
    units = [x / (n + eps) for x, n in zip(xs, norms)]
    mean = sum(wi * u for wi, u in zip(w, units))
    mean = mean / np.linalg.norm(mean)
    tangent = sum(wi * (u - (u @ mean) * mean) for wi, u in zip(w, units))
    tn = np.linalg.norm(tangent) + eps
    out = (mean * math.cos(tn) + tangent * math.sin(tn) / tn) * float(norms @ w)
    return out if base is None else out + np.ravel(base)


def np_model_stock_rows(base, ws):
    """Model Stock on each row (last axis) of 2-D arrays."""
    base = np.asarray(base, np.float64)
    ws = [np.asarray(w, np.float64) for w in ws]
    n = len(ws)
    out = np.empty_like(base)
    for r in range(base.shape[0]):
        taus = [w[r] - base[r] for w in ws]
        cs = [np.clip(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-6), -1, 1)
              for i, a in enumerate(taus) for b in taus[i + 1:]]
        c = np.mean(cs)
        t = n * c / (1 + (n - 1) * c)
        out[r] = t * np.mean([w[r] for w in ws], axis=0) + (1 - t) * base[r]
    return out


def np_arcee(base, theta, sample=None):
    base, theta = np.asarray(base, np.float64), np.asarray(theta, np.float64)

    def softmax(x):
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)
    p, q = softmax(theta) + 1e-8, softmax(base) + 1e-8
    imp = np.abs(theta - base) * (p * np.log(p / q)).sum(-1, keepdims=True)
    flat = imp.ravel()
    if sample is not None:
        flat = flat[[i * flat.size // sample for i in range(sample)]]
    s = np.sort(flat)
    m = s.size - 1
    q1, med, q3 = s[int(math.floor(0.25 * m))], s[int(math.floor(0.5 * m))], s[int(math.floor(0.75 * m))]
    return base + (theta - base) * (imp >= med + 1.5 * (q3 - q1))


rng = np.random.default_rng(0)
A8, B8, C8, D8 = (rng.normal(size=8).astype(np.float32) for _ in range(4))


# ---- registry ---------------------------------------------------------------------------------

def test_registered_with_mergekit_names_and_defaults():
    expect = {
        "linear": ({"weight": None}, {"normalize": True}, "none"),
        "slerp": ({}, {"t": None}, "required"),
        "nuslerp": ({"weight": None}, {"nuslerp_flatten": True, "nuslerp_row_wise": False},
                    "optional"),
        "multislerp": ({"weight": None}, {"normalize_weights": True, "eps": 1e-8}, "optional"),
        "karcher": ({}, {"max_iter": 10, "tol": 1e-5}, "optional"),
        "model_stock": ({}, {"filter_wise": False}, "required"),
        "nearswap": ({}, {"t": None}, "required"),
        "arcee_fusion": ({}, {}, "required"),
        "passthrough": ({"scale": 1.0}, {}, "none"),
        "mergealign": ({}, {"alpha": 0.5, "beta": 0.5}, "required"),
        "somf": ({"mask": None, "weight": 1.0}, {}, "required"),
    }
    for name, (mp, gp, base) in expect.items():
        m = get(name)
        assert (m.model_params, m.global_params, m.base) == (mp, gp, base), name
        assert not m.stochastic
    assert get("model_stock").min_models == 2
    assert get("nuslerp").static_params == {"nuslerp_flatten", "nuslerp_row_wise"}


# ---- slerp ------------------------------------------------------------------------------------

def test_slerp_orthogonal_unit_vectors_midpoint():
    close(merge("slerp", [1, 0, 0, 0], [[0, 1, 0, 0]], t=0.5), [R2, R2, 0, 0])


def test_slerp_endpoints_and_magnitudes():
    a, b = [3.0, 0.0], [0.0, 2.0]
    close(merge("slerp", a, [b], t=0.0), a)
    close(merge("slerp", a, [b], t=1.0), b)
    # Ω = π/2: weights sin(π/4)/sin(π/2) on the unnormalised inputs.
    close(merge("slerp", a, [b], t=0.5), [3 * R2, 2 * R2])


def test_slerp_colinear_falls_back_to_lerp():
    a, b = [1.0, 2.0, 3.0], [2.0, 4.0, 6.001]
    close(merge("slerp", a, [b], t=0.25), [1.25, 2.5, 3.75025])
    close(merge("slerp", a, [[-2.0, -4.0, -6.0]], t=0.5), [-0.5, -1.0, -1.5])


def test_slerp_matches_formula_on_random_matrix():
    a, b = A8.reshape(2, 4), B8.reshape(2, 4)
    close(merge("slerp", a, [b], t=0.3), np_slerp(0.3, a, b).reshape(2, 4))


def test_slerp_keeps_base_dtype():
    a = jnp.asarray([1.0, 0.0], jnp.bfloat16)
    b = jnp.asarray([0.0, 1.0], jnp.bfloat16)
    out = get("slerp").fn(a, [b], key=None, t=0.5)
    assert out.dtype == jnp.bfloat16
    close(out.astype(jnp.float32), [R2, R2], atol=1e-2)


def test_slerp_vmap_over_layers_equals_per_layer():
    base = rng.normal(size=(3, 2, 4)).astype(np.float32)
    other = rng.normal(size=(3, 2, 4)).astype(np.float32)
    other[1] = 2 * base[1]  # one colinear layer takes the lerp branch
    ts = jnp.asarray([0.1, 0.5, 0.9])
    fn = get("slerp").fn
    stacked = jax.jit(jax.vmap(lambda b, o, t: fn(b, [o], key=None, t=t)))(base, other, ts)
    for i in range(3):
        close(stacked[i], merge("slerp", base[i], [other[i]], t=float(ts[i])))
        close(stacked[i], np_slerp(float(ts[i]), base[i], other[i]).reshape(2, 4))


# ---- linear -----------------------------------------------------------------------------------

def test_linear_normalize_and_not():
    a, b = [1.0, 2.0], [5.0, -2.0]
    close(merge("linear", None, [a, b], weight=[1.0, 3.0], normalize=1.0), [4.0, -1.0])
    close(merge("linear", None, [a, b], weight=[1.0, 3.0], normalize=0.0), [16.0, -4.0])


def test_linear_zero_weight_sum_with_normalize_is_a_user_error():
    with pytest.raises(JmergeError):
        get("linear").fn(None, [jnp.ones(2), jnp.ones(2)], key=None, weight=[1.0, -1.0])


def test_linear_vmap_over_layers_equals_per_layer():
    x = rng.normal(size=(3, 2, 5)).astype(np.float32)
    y = rng.normal(size=(3, 2, 5)).astype(np.float32)
    w1 = jnp.asarray([0.2, 1.0, 3.0])
    fn = get("linear").fn
    stacked = jax.jit(jax.vmap(lambda a, b, w: fn(None, [a, b], key=None, weight=[w, 1.0])))(x, y, w1)
    for i in range(3):
        w = float(w1[i])
        close(stacked[i], merge("linear", None, [x[i], y[i]], weight=[w, 1.0], normalize=1.0))
        close(stacked[i], (w * x[i] + y[i]) / (w + 1))


# ---- nuslerp ----------------------------------------------------------------------------------

def test_nuslerp_weights_give_t():
    a, b = [1.0, 0.0], [0.0, 1.0]
    close(merge("nuslerp", None, [a, b], weight=[1.0, 1.0]), [R2, R2])
    # t = 3/(1+3) = 0.75: angle π/2·0.75 from a.
    close(merge("nuslerp", None, [a, b], weight=[1.0, 3.0]),
          [math.cos(3 * math.pi / 8), math.sin(3 * math.pi / 8)])
    # weights summing to ~0 use t = 0.5
    close(merge("nuslerp", None, [a, b], weight=[1.0, -1.0]), [R2, R2])


def test_nuslerp_with_base_slerps_task_vectors():
    base = [1.0, 1.0, 1.0]
    close(merge("nuslerp", base, [[2.0, 1.0, 1.0], [1.0, 2.0, 1.0]], weight=[1.0, 1.0]),
          [1 + R2, 1 + R2, 1.0])


def test_nuslerp_per_vector_modes():
    v0 = np.array([[1.0, 0.0], [0.0, 2.0]])
    v1 = np.array([[0.0, 1.0], [0.0, 2.0]])
    # along the last axis: row 0 orthogonal, row 1 identical (lerp)
    close(merge("nuslerp", None, [v0, v1], static=(("nuslerp_flatten", False),), weight=[1, 1]),
          [[R2, R2], [0.0, 2.0]])
    # "row_wise" slerps along axis 0 (mergekit transposes dim 0 to the end)
    want = np.stack([np_slerp_vec(0.5, v0[:, j], v1[:, j]) for j in range(2)], axis=1)
    assert abs(want[0, 0] - R2) < 1e-12  # column 0 meets a zero vector: Ω = π/2
    close(merge("nuslerp", None, [v0, v1],
                static=(("nuslerp_flatten", False), ("nuslerp_row_wise", True)), weight=[1, 1]),
          want)
    a, b = A8.reshape(2, 4), B8.reshape(2, 4)
    want = np.stack([np_slerp_vec(0.25, a[i], b[i]) for i in range(2)])
    close(merge("nuslerp", None, [a, b], static=(("nuslerp_flatten", False),), weight=[3, 1]), want)


# ---- multislerp -------------------------------------------------------------------------------

def test_multislerp_hand_values():
    close(merge("multislerp", None, [[1, 0], [0, 1]], weight=[1, 1], normalize_weights=1.0),
          [R2, R2])
    # direction (1,1)/√2, length = weighted mean of norms (2+4)/2
    close(merge("multislerp", None, [[2, 0], [0, 4]], weight=[1, 1], normalize_weights=1.0),
          [3 * R2, 3 * R2])
    # antipodal with equal weights: linear fallback
    close(merge("multislerp", None, [[1, 0], [-1, 0]], weight=[1, 1], normalize_weights=1.0),
          [0, 0])


def test_multislerp_matches_formula():
    xs = [A8, B8, C8]
    close(merge("multislerp", None, xs, weight=[0.2, 0.5, 0.3], normalize_weights=1.0),
          np_multislerp(xs, [0.2, 0.5, 0.3]))
    close(merge("multislerp", D8, xs, weight=[1, 2, 3], normalize_weights=0.0),
          np_multislerp(xs, [1, 2, 3], base=D8, normalize=False), atol=1e-5)


# ---- karcher ----------------------------------------------------------------------------------

def test_karcher_two_unit_vectors_is_slerp_midpoint():
    close(merge("karcher", None, [[1, 0, 0], [0, 1, 0]], static=(("max_iter", 10),), tol=1e-5),
          [R2, R2, 0])
    # scaled by the mean norm (2 + 4)/2
    close(merge("karcher", None, [[2, 0, 0], [0, 4, 0]], static=(("max_iter", 10),), tol=1e-5),
          [3 * R2, 3 * R2, 0])
    # the base, when given, is one more point
    close(merge("karcher", [1, 0, 0], [[0, 1, 0]], static=(("max_iter", 10),), tol=1e-5),
          [R2, R2, 0])


def test_karcher_points_on_a_great_circle_average_their_angles():
    angles = [0.0, 0.2, 1.0]
    pts = [[math.cos(a), math.sin(a), 0.0] for a in angles]
    close(merge("karcher", None, pts, static=(("max_iter", 10),), tol=1e-7),
          [math.cos(0.4), math.sin(0.4), 0.0], atol=1e-5)


def test_karcher_zero_tensor_counts_in_scale_only():
    close(merge("karcher", None, [[2, 0, 0], [0, 0, 0]], static=(("max_iter", 10),), tol=1e-5),
          [1, 0, 0])
    close(merge("karcher", None, [[0, 0, 0], [0, 0, 0]], static=(("max_iter", 10),), tol=1e-5),
          [0, 0, 0])


# ---- model_stock ------------------------------------------------------------------------------

def test_model_stock_t_from_known_cosine():
    # τ1, τ2 at 60°: c = 1/2, N = 2, t = 2·½/(1+½) = 2/3
    base = np.array([1.0, 1.0])
    m1 = base + [1.0, 0.0]
    m2 = base + [0.5, math.sqrt(3) / 2]
    t = 2 / 3
    close(merge("model_stock", base, [m1, m2]), t * (m1 + m2) / 2 + (1 - t) * base)


def test_model_stock_filter_wise_and_three_models():
    base = np.zeros((2, 2))
    m1 = np.array([[1.0, 0.0], [1.0, 0.0]])
    m2 = np.array([[0.5, math.sqrt(3) / 2], [0.0, 1.0]])
    # row 0: t = 2/3; row 1: orthogonal, c = 0, t = 0 (stays at the base)
    close(merge("model_stock", base, [m1, m2], static=(("filter_wise", True),)),
          [[0.5, math.sqrt(3) / 6], [0.0, 0.0]])
    b, xs = A8.reshape(2, 4), [B8.reshape(2, 4), C8.reshape(2, 4), D8.reshape(2, 4)]
    close(merge("model_stock", b, xs, static=(("filter_wise", True),)),
          np_model_stock_rows(b, xs), atol=1e-5)
    close(merge("model_stock", b, xs),
          np_model_stock_rows(b.reshape(1, -1), [x.reshape(1, -1) for x in xs]).reshape(2, 4),
          atol=1e-5)


# ---- nearswap ---------------------------------------------------------------------------------

def test_nearswap_hand_values():
    base = [0.0, 0.0, 0.0, 1.0]
    other = [0.1, 1.0, -0.5, 1.0]
    # w = clip(0.2/|Δ|) = [1, 0.2, 0.4, 1 (Δ = 0)]
    close(merge("nearswap", base, [other], t=0.2), [0.1, 0.2, -0.2, 1.0])


def test_nearswap_rejects_nonpositive_literal_t():
    with pytest.raises(JmergeError):
        get("nearswap").fn(jnp.zeros(2), [jnp.ones(2)], key=None, t=0.0)


# ---- arcee_fusion -----------------------------------------------------------------------------

def test_arcee_fusion_keeps_outliers_only():
    # 1-D: one KL for the whole vector, so the threshold is KL·(median + 1.5·IQR) of |Δ|.
    # sorted |Δ| = .1 … .7, .98: lower quantiles at floor(q·7) → q1=.2, med=.4, q3=.6, thr=1.0,
    # so .98 is dropped (linear-interpolated quantiles would give .975 and keep it).
    delta = np.array([0.1, -0.2, 0.3, 0.4, -0.5, 0.6, 0.7, 0.98])
    base = np.zeros(8)
    close(merge("arcee_fusion", base, [base + delta]), np.zeros(8))
    delta[-1] = 3.0
    close(merge("arcee_fusion", base, [base + delta]), [0, 0, 0, 0, 0, 0, 0, 3.0])


def test_arcee_fusion_matches_formula_per_row():
    b = A8.reshape(2, 4)
    th = b + np.array([[0.1, 2.0, -0.3, 0.05], [1.5, -0.2, 0.0, 0.4]], np.float32)
    close(merge("arcee_fusion", b, [th]), np_arcee(b, th))


def test_arcee_fusion_large_tensor_uses_strided_sample():
    n = 1_000_003
    r = np.random.default_rng(1)
    b = r.normal(size=n).astype(np.float32)
    th = (b + r.standard_t(2, size=n)).astype(np.float32)
    got = np.asarray(get("arcee_fusion").fn(jnp.asarray(b), [jnp.asarray(th)], key=None))
    want = np_arcee(b, th, sample=1_000_000)
    # float32 vs float64 may flip entries sitting exactly at the threshold, nothing more
    assert np.mean(np.isclose(got, want, rtol=0, atol=1e-5)) > 0.9999


# ---- mergealign -------------------------------------------------------------------------------

def test_mergealign_hand_value():
    close(merge("mergealign", [1, 1], [[3, 1], [1, 5]], alpha=0.5, beta=0.25), [2, 2])


def test_mergealign_convex_weights_equal_interpolation_of_models():
    for alpha in (0.0, 0.3, 1.0):
        close(merge("mergealign", A8, [B8, C8], alpha=alpha, beta=1 - alpha),
              alpha * B8.astype(np.float64) + (1 - alpha) * C8, atol=1e-5)


# ---- somf -------------------------------------------------------------------------------------

def test_somf_binary_and_soft_masks():
    base = [1.0, 1.0, 1.0, 1.0]
    model = [2.0, 3.0, 4.0, 5.0]  # τ = [1, 2, 3, 4]
    # binary, mean ½: τ·m/½
    close(merge("somf", base, [model], mask=[[1, 0, 1, 0]], weight=[1.0]), [3, 1, 7, 1])
    # soft, mean ½
    close(merge("somf", base, [model], mask=[[0.5, 0.5, 1, 0]], weight=[1.0]), [2, 3, 7, 1])
    # all-zero mask adds nothing
    close(merge("somf", base, [model], mask=[[0, 0, 0, 0]], weight=[1.0]), base)


def test_somf_two_models_weights_and_bool_mask():
    base = np.zeros(4)
    m1, m2 = np.array([1.0, 2.0, 3.0, 4.0]), np.array([4.0, 0.0, 0.0, 4.0])
    mask1 = np.array([True, True, False, False])   # mean ½
    mask2 = np.array([1.0, 1.0, 1.0, 1.0])         # mean 1
    out = get("somf").fn(jnp.asarray(base), [jnp.asarray(m1), jnp.asarray(m2)], key=None,
                         mask=[jnp.asarray(mask1), jnp.asarray(mask2)], weight=[0.3, 0.5])
    close(out, 0.3 * np.array([2.0, 4.0, 0, 0]) + 0.5 * m2)


# ---- passthrough ------------------------------------------------------------------------------

def test_passthrough_scale():
    close(merge("passthrough", None, [[1.0, -2.0, 4.0]], scale=[0.5]), [0.5, -1.0, 2.0])
    x = jnp.asarray([1.0, 2.0], jnp.bfloat16)
    out = get("passthrough").fn(None, [x], key=None, scale=[1.0])
    assert out.dtype == jnp.bfloat16 and (out == x).all()


# ---- differentiability (search takes gradients through merges) ---------------------------------

def test_gradients_stay_finite_at_colinear_inputs():
    a = jnp.asarray([1.0, 2.0, 3.0])
    calls = {
        "slerp": lambda p: get("slerp").fn(a, [p * a], key=None, t=p),
        "nuslerp": lambda p: get("nuslerp").fn(None, [a, p * a], key=None, weight=[1.0, p]),
        "karcher": lambda p: get("karcher").fn(None, [a, p * a], key=None),
        "multislerp": lambda p: get("multislerp").fn(None, [a, p * a], key=None, weight=[1.0, p]),
    }
    for name, f in calls.items():
        grad = jax.jit(jax.vmap(jax.grad(lambda p, f=f: f(p).sum())))
        g = np.asarray(grad(jnp.asarray([0.7, 1.0, 2.0])))
        assert np.isfinite(g).all(), (name, g)
        if name == "karcher":
            # colinear inputs: (|a| + p|a|)/2 · a/|a|, so d/dp Σ = Σa / 2 = 3
            close(g, [3.0, 3.0, 3.0], atol=1e-4)
