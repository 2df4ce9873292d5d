"""The safety merge methods (issue 18): resta, safe_lora, safemerge, led, against numpy
transcriptions of each paper's formula, on 2-D and 1-D tensors, float32 and bfloat16, traced
parameters under jit, vmapped over a stacked layer axis as the engine calls them; edge cases; bad
input; one `jmerge merge` per data-free method."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmerge.errors import JmergeError
from jmerge.merge import registry  # importing the package registers every method
from jmerge.merge.safemerge import safemerge_layers

pytestmark = pytest.mark.usefixtures("no_persistent_compile_cache")
RNG = np.random.default_rng(0)
KEY = jax.random.key(7)


def fn(name):
    return registry.METHODS[name].fn


def trio(shape, dtype=np.float32, scale=0.1):
    """(base, fine-tune, aligned): the two experts near the base, as fine-tunes are."""
    b = RNG.standard_normal(shape).astype(np.float32)
    ft = b + scale * RNG.standard_normal(shape).astype(np.float32)
    al = b + scale * RNG.standard_normal(shape).astype(np.float32)
    return [np.asarray(jnp.asarray(x, dtype)) for x in (b, ft, al)]


def f32(x):
    return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


def close(got, want, dtype=np.float32):
    got = f32(got)
    if np.dtype(dtype) == np.float32:
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    else:  # the result is rounded once to bfloat16
        np.testing.assert_allclose(got, f32(jnp.asarray(want, jnp.bfloat16)), rtol=1e-2, atol=1e-2)


# ---- numpy transcriptions of the papers ------------------------------------------------------

def np_resta(b, ft, al, gamma, keep, rescale=True):
    tau = f32(al) - f32(b)
    kept = tau * keep
    if rescale and np.abs(tau).sum() >= 1e-7 and np.abs(kept).sum() >= 1e-7:
        kept = kept * np.abs(tau).sum() / np.abs(kept).sum()
    return f32(ft) + gamma * kept


def np_cos(b, ft, al, delta_from="base"):
    """(cos(ΔW, CΔW), CΔW, ΔW) with C = V Vᵀ / ‖V‖_F formed explicitly."""
    v = f32(al) - f32(b)
    dw = f32(ft) - f32(b if delta_from == "base" else al)
    c = v @ v.T / np.linalg.norm(v)
    cdw = c @ dw
    return np.sum(dw * cdw) / (np.linalg.norm(dw) * np.linalg.norm(cdw)), cdw, dw


def np_safe_lora(b, ft, al, threshold, delta_from="base"):
    if np.ndim(b) != 2:
        return f32(ft) - f32(b if delta_from == "base" else al) + f32(al)
    cos, cdw, dw = np_cos(b, ft, al, delta_from)
    return f32(al) + (cdw if cos < threshold else dw)


def np_safemerge(b, ft, al, threshold, w):
    if np.ndim(b) != 2 or np_cos(b, ft, al)[0] >= threshold:
        return f32(ft)
    return w * f32(ft) + (1 - w) * f32(al)


def np_top(s, k):
    """Mask of the k largest scores, ties to the lowest flat index."""
    order = np.argsort(-np.asarray(s, np.float64).ravel(), kind="stable")
    m = np.zeros(np.size(s), bool)
    m[order[:k]] = True
    return m.reshape(np.shape(s))


def np_led(b, models, scores, base_scores, ks, weights):
    elected = [np_top(s, k) & np_top(bs, k) for s, bs, k in zip(scores, base_scores, ks)]
    claims = sum(e.astype(int) for e in elected)
    out = f32(b)
    for m, e, w in zip(models, elected, weights):
        out = out + w * np.where(e & (claims == 1), f32(m) - f32(b), 0.0)
    return out


# ---- jitted as the engine calls them (module level: one compilation per shape and dtype) ------

resta_jit = jax.jit(lambda b, ft, al, key, gamma, density: fn("resta")(b, [ft, al], key=key, gamma=gamma,
                                                                      density=density))
safe_lora_jit = jax.jit(lambda b, ft, al, t: fn("safe_lora")(b, [ft, al], threshold=t))
safemerge_jit = jax.jit(lambda b, ft, al, t, w: fn("safemerge")(b, [ft, al], threshold=t, weight=w))


def stacked(f):
    """f vmapped over a leading layer axis of the arrays, parameters shared (the engine's call)."""
    return jax.jit(jax.vmap(f, in_axes=(0, 0, 0) + (None,) * (f.__code__.co_argcount - 3)))


safe_lora_layers = stacked(lambda b, ft, al, t: fn("safe_lora")(b, [ft, al], threshold=t))
safemerge_stack = stacked(lambda b, ft, al, t, w: fn("safemerge")(b, [ft, al], threshold=t, weight=w))
decisions = stacked(lambda b, ft, al, t: safemerge_layers(b, [ft, al], threshold=t))

SHAPES = [(6, 4), (4, 6), (5,)]
DTYPES = [np.float32, jnp.bfloat16]


# ---- resta -----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_resta_formula(shape, dtype):
    b, ft, al = trio(shape, dtype)
    gamma, density = np.float32(0.7), np.float32(0.6)
    got = resta_jit(b, ft, al, KEY, gamma, density)
    keep = np.asarray(jax.random.bernoulli(jax.random.fold_in(KEY, 1), density, shape))
    assert 0 < keep.sum() < keep.size
    assert got.dtype == jnp.asarray(b).dtype and got.shape == shape
    close(got, np_resta(b, ft, al, 0.7, keep), dtype)


def test_resta_density_one_is_plain_task_arithmetic():
    b, ft, al = trio((6, 4))
    close(resta_jit(b, ft, al, KEY, np.float32(0.5), np.float32(1.0)), f32(ft) + 0.5 * (f32(al) - f32(b)))
    close(resta_jit(b, ft, al, KEY, np.float32(0.0), np.float32(0.3)), f32(ft))  # gamma 0: the fine-tune


def test_resta_mask_is_dare_linears():
    """Same key semantics as dare_linear: the safety model's mask is fold_in(key, 1), whatever else
    is merged, so resta(γ=1) is dare_linear with weights 1 and the fine-tune kept whole."""
    b, ft, al = trio((8, 8))
    want = fn("dare_linear")(b, [ft, al], key=KEY, weight=(1.0, 1.0), density=(1.0, 0.4))
    close(fn("resta")(b, [ft, al], key=KEY, gamma=1.0, density=0.4), f32(want))


def test_resta_stacked_layers_each_own_mask_free():
    b, ft, al = trio((3, 6, 4))
    got = jax.jit(jax.vmap(lambda b, ft, al, k: fn("resta")(b, [ft, al], key=k, gamma=1.0, density=0.5),
                           in_axes=(0, 0, 0, None)))(b, ft, al, KEY)
    for i in range(3):  # a layer's mask is the same as when it is merged alone (same key)
        close(got[i], f32(fn("resta")(b[i], [ft[i], al[i]], key=KEY, gamma=1.0, density=0.5)))


# ---- safe_lora -------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_safe_lora_formula(shape, dtype):
    b, ft, al = trio(shape, dtype)
    cos = np_cos(b, ft, al)[0] if len(shape) == 2 else 0.5
    for t in (cos - 0.05, cos + 0.05):  # either side of this tensor's similarity
        t = float(np.clip(t, 0, 1))
        got = safe_lora_jit(b, ft, al, np.float32(t))
        assert got.dtype == jnp.asarray(b).dtype and got.shape == shape
        close(got, np_safe_lora(b, ft, al, t), dtype)


def test_safe_lora_delta_from_aligned():
    b, ft, al = trio((6, 4))
    cos = np_cos(b, ft, al, "aligned")[0]
    for t in (cos - 0.05, cos + 0.05):
        got = fn("safe_lora")(b, [ft, al], threshold=t, delta_from="aligned")
        close(got, np_safe_lora(b, ft, al, t, "aligned"))
    with pytest.raises(JmergeError, match="delta_from"):
        fn("safe_lora")(b, [ft, al], threshold=0.5, delta_from="instruct")


def test_safe_lora_projection_never_forms_c_and_matches_it():
    """C ΔW through the smaller side of V, both orientations, against C formed in numpy."""
    from jmerge.merge.safe_lora import project
    for shape in ((7, 3), (3, 7)):
        v, dw = RNG.standard_normal(shape), RNG.standard_normal(shape)
        close(project(jnp.asarray(v, jnp.float32), jnp.asarray(dw, jnp.float32)),
              v @ v.T @ dw / np.linalg.norm(v))


def test_safe_lora_stacked_layers():
    b, ft, al = trio((4, 6, 4))
    coss = np.array([np_cos(b[i], ft[i], al[i])[0] for i in range(4)])
    t = float(np.median(coss))  # some layers projected, some not
    assert (coss < t).any() and (coss >= t).any()
    got = safe_lora_layers(b, ft, al, np.float32(t))
    for i in range(4):
        close(got[i], np_safe_lora(b[i], ft[i], al[i], t))


def test_safe_lora_edges():
    b, ft, al = trio((6, 4))
    # threshold 0 projects nothing: θ_aligned + ΔW; threshold 1 projects (cos < 1 here)
    close(safe_lora_jit(b, ft, al, np.float32(0.0)), f32(al) + f32(ft) - f32(b))
    close(safe_lora_jit(b, ft, al, np.float32(1.0)), f32(al) + np_cos(b, ft, al)[1])
    # V = 0 (aligned == base): nothing to project onto, ΔW kept, finite
    got = safe_lora_jit(b, ft, b, np.float32(1.0))
    close(got, f32(ft))
    # ΔW = 0: the aligned model
    close(safe_lora_jit(b, b, al, np.float32(1.0)), f32(al))


def test_safe_lora_gradients_finite_at_zero():
    b, ft, _ = trio((6, 4))
    g = jax.grad(lambda x: jnp.sum(fn("safe_lora")(b, [x, b], threshold=1.0)))(jnp.asarray(ft))
    assert np.isfinite(np.asarray(g)).all()


# ---- safemerge -------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_safemerge_formula(shape, dtype):
    b, ft, al = trio(shape, dtype)
    cos = np_cos(b, ft, al)[0] if len(shape) == 2 else 0.5
    for t in (cos - 0.05, cos + 0.05):
        t = float(np.clip(t, 0, 1))
        got = safemerge_jit(b, ft, al, np.float32(t), np.float32(0.3))
        assert got.dtype == jnp.asarray(b).dtype and got.shape == shape
        close(got, np_safemerge(b, ft, al, t, 0.3), dtype)


def test_safemerge_stacked_layers_and_decisions():
    b, ft, al = trio((4, 6, 4))
    coss = np.array([np_cos(b[i], ft[i], al[i])[0] for i in range(4)])
    t = float(np.median(coss))
    np.testing.assert_array_equal(np.asarray(decisions(b, ft, al, np.float32(t))), coss < t)
    got = safemerge_stack(b, ft, al, np.float32(t), np.float32(0.5))
    for i in range(4):
        close(got[i], np_safemerge(b[i], ft[i], al[i], t, 0.5))
    # extremes: threshold 0 merges no layer, 1 every layer; 1-D tensors never
    assert not np.asarray(decisions(b, ft, al, np.float32(0.0))).any()
    assert np.asarray(decisions(b, ft, al, np.float32(1.0))).all()
    assert not bool(safemerge_layers(b[0, 0], [ft[0, 0], al[0, 0]], threshold=1.0))


def test_safemerge_ties_merge_is_jmerges_ties():
    b, ft, al = trio((6, 4))
    got = fn("safemerge")(b, [ft, al], threshold=1.0, weight=0.6, density=0.5, merge="ties")
    want = fn("ties")(b, [ft, al], weight=(0.6, 0.4), density=(0.5, 0.5))
    close(got, f32(want))
    with pytest.raises(JmergeError, match="merge must be"):
        fn("safemerge")(b, [ft, al], merge="slerp")


def test_safemerge_edges():
    b, ft, al = trio((6, 4))
    # V = 0: cosine 1, never below a threshold in [0, 1]: the fine-tune kept
    close(fn("safemerge")(b, [ft, b], threshold=1.0), f32(ft))
    # ΔW = 0: kept (it is the base, nothing left the subspace)
    close(fn("safemerge")(b, [b, al], threshold=1.0), f32(b))


# ---- led -------------------------------------------------------------------------------------

led_jit = jax.jit(lambda b, ms, s, bs, w, d: fn("led")(b, list(ms), scores=s, base_scores=bs, weight=w,
                                                       density=d))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(6, 5), (10,)])
def test_led_formula(shape, dtype):
    b, ft, al = trio(shape, dtype)
    n = int(np.prod(shape))
    s = tuple(RNG.uniform(size=shape).astype(np.float32) for _ in range(2))
    bs = tuple(RNG.uniform(size=shape).astype(np.float32) for _ in range(2))
    dens = (np.float32(0.5), np.float32(0.7))
    ks = [int(np.floor(d * n + 0.5)) for d in dens]  # a traced density keeps round(d * n)
    got = led_jit(b, (ft, al), s, bs, (np.float32(1.0), np.float32(0.5)), dens)
    assert got.dtype == jnp.asarray(b).dtype and got.shape == shape
    want = np_led(b, [ft, al], s, bs, ks, [1.0, 0.5])
    close(got, want, dtype)
    # the disjoint step drops something here, or the test would not see it
    assert (np_top(s[0], ks[0]) & np_top(bs[0], ks[0]) & np_top(s[1], ks[1]) & np_top(bs[1], ks[1])).any()


def test_led_eager_density_and_ties_in_scores():
    b, ft, al = trio((4, 5))
    s = (np.ones((4, 5), np.float32), np.arange(20, dtype=np.float32).reshape(4, 5))
    bs = (np.ones((4, 5), np.float32), np.ones((4, 5), np.float32))
    got = fn("led")(b, [ft, al], scores=s, base_scores=bs, density=(0.33, 0.5))
    # a known density keeps mergekit's max(1, int(d * n)); equal scores go to the lowest indices
    close(got, np_led(b, [ft, al], s, bs, [int(0.33 * 20), int(0.5 * 20)], [1.0, 1.0]))


def test_led_stacked_layers_and_edges():
    b, ft, al = trio((3, 4, 5))
    s = tuple(RNG.uniform(size=(3, 4, 5)).astype(np.float32) for _ in range(2))
    got = jax.jit(jax.vmap(lambda b, ft, al, s0, s1: fn("led")(
        b, [ft, al], scores=(s0, s1), base_scores=(s0, s1), density=(0.4, 0.4))))(b, ft, al, *s)
    for i in range(3):
        close(got[i], np_led(b[i], [ft[i], al[i]], (s[0][i], s[1][i]), (s[0][i], s[1][i]), [8, 8], [1, 1]))
    # identical scores for both tasks: every elected entry claimed twice, the base comes back
    same = (s[0][0], s[0][0])
    close(fn("led")(b[0], [ft[0], al[0]], scores=same, base_scores=same, density=(0.5, 0.5)), f32(b[0]))
    # density 1 with one model: all elected, plain task arithmetic
    close(fn("led")(b[0], [ft[0]], scores=(s[0][0],), base_scores=(s[1][0],), density=(1.0,)), f32(ft[0]))
    with pytest.raises(JmergeError, match="one array per model"):
        fn("led")(b[0], [ft[0], al[0]], scores=s[0][0], base_scores=same)


# ---- bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize("method,param,value", [
    ("resta", "gamma", -0.1), ("resta", "density", 0.0), ("resta", "density", 1.5),
    ("safe_lora", "threshold", 1.5), ("safe_lora", "threshold", -0.1),
    ("safemerge", "threshold", 2.0), ("led", "density", 0.0)])
def test_out_of_range_declared(method, param, value):
    r = registry.METHODS[method].params[param].range
    assert r is not None and value not in r


def test_nonfinite_concrete_input_one_line():
    b, ft, al = trio((6, 4))
    bad = ft.copy()
    bad[0, 0] = np.nan
    for name in ("safe_lora", "safemerge"):
        with pytest.raises(JmergeError, match="non-finite"):
            fn(name)(b, [bad, al], threshold=0.5)


# ---- end to end: `jmerge merge` through a YAML -----------------------------------------------

def tensors(d):
    from jmerge.io.safetensors_io import Checkpoint
    ck = Checkpoint(d)
    return {n: np.array(ck.array(n)) for n in ck.names()}


@pytest.mark.parametrize("method,params,golden", [
    ("resta", "{gamma: 0.5, density: 1.0}", lambda b, ft, al: f32(ft) + 0.5 * (f32(al) - f32(b))),
    ("safe_lora", "{threshold: 0.75}", lambda b, ft, al: np_safe_lora(b, ft, al, 0.75)),
    ("safemerge", "{threshold: 0.75, weight: 0.4}", lambda b, ft, al: np_safemerge(b, ft, al, 0.75, 0.4)),
])
def test_cli_merge(capsys, tmp_path, dirs, method, params, golden):
    from jmerge.cli import merge, run
    cfg = tmp_path / "c.yml"
    cfg.write_text(f"models: [{{model: {dirs['m1']}}}, {{model: {dirs['m2']}}}]\nmerge_method: {method}\n"
                   f"base_model: {dirs['m0']}\nparameters: {params}\n")
    capsys.readouterr()
    rc = run(merge.main, [str(cfg), str(tmp_path / "out"), "-q"])
    assert rc == 0, capsys.readouterr().err
    got = tensors(tmp_path / "out")
    b, ft, al = tensors(dirs["m0"]), tensors(dirs["m1"]), tensors(dirs["m2"])
    assert set(got) == set(b)
    coss = [np_cos(b[n], ft[n], al[n])[0] for n in b if b[n].ndim == 2]
    assert min(coss) < 0.75 < max(coss)  # the threshold splits the tensors: both branches are checked
    for n in b:
        np.testing.assert_allclose(f32(got[n]), golden(b[n], ft[n], al[n]), rtol=1e-4, atol=1e-5, err_msg=n)


def test_inspect_reports_the_tensors_safemerge_merges(capsys, tmp_path, dirs):
    """`jmerge inspect` of a safemerge config lists the tensors the merge merges: exactly those
    where `jmerge merge` of the same config wrote something other than the fine-tune."""
    import json

    from jmerge.cli import inspect, merge, run
    cfg = tmp_path / "c.yml"
    cfg.write_text(f"models: [{{model: {dirs['m1']}}}, {{model: {dirs['m2']}}}]\nmerge_method: safemerge\n"
                   f"base_model: {dirs['m0']}\nparameters: {{threshold: 0.75, weight: 0.4}}\n")
    capsys.readouterr()
    assert run(merge.main, [str(cfg), str(tmp_path / "out"), "-q"]) == 0, capsys.readouterr().err
    assert run(inspect.main, [str(cfg), "--out", str(tmp_path / "report")]) == 0, capsys.readouterr().err
    rep = json.loads((tmp_path / "report" / "report.json").read_text())["safemerge"]
    got, ft = tensors(tmp_path / "out"), tensors(dirs["m1"])
    changed = sorted(n for n in got if not np.array_equal(f32(got[n]), f32(ft[n])))
    assert sorted(rep["merged"]) == changed and 0 < len(changed) < len(got)
    assert rep["threshold"] == 0.75 and all((rep["cosine"][n] < 0.75) == (n in changed) for n in rep["cosine"])


def test_cli_rejects_out_of_range(capsys, tmp_path, dirs):
    from jmerge.cli import merge, run
    cfg = tmp_path / "c.yml"
    cfg.write_text(f"models: [{{model: {dirs['m1']}}}, {{model: {dirs['m2']}}}]\nmerge_method: safe_lora\n"
                   f"base_model: {dirs['m0']}\nparameters: {{threshold: 1.5}}\n")
    capsys.readouterr()
    rc = run(merge.main, [str(cfg), str(tmp_path / "out"), "-q"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "threshold" in err, err
    assert not (tmp_path / "out").exists()


# ---- the search's MethodSettings (baselines) -------------------------------------------------

@pytest.mark.parametrize("method,values", [("resta", {"gamma": 0.5, "density": 1.0}),
                                           ("safe_lora", {"threshold": 0.9}),
                                           ("safemerge", {"threshold": 0.9, "weight": 0.5})])
def test_method_settings_drive_global_params(method, values):
    """The search materialises a baseline through MethodSettings; these methods' parameters are
    global, so they go in `global_names` (run.py's BASELINE_SETTINGS path passes them as per-model
    `names` today, which these methods cannot take: see the report)."""
    from jmerge.search.parametrisations import MethodSettings
    b2, ft2, al2 = trio((6, 4))
    b1, ft1, al1 = trio((4,))
    base = {"w": jnp.asarray(b2), "n": jnp.asarray(b1)}
    tvs = [{"w": jnp.asarray(x2 - b2), "n": jnp.asarray(x1 - b1)} for x2, x1 in ((ft2, ft1), (al2, al1))]
    p = MethodSettings(method, 2, (), tuple(values))
    got = p.rest(base, tvs, p.theta0(1, values)["rest"], jax.random.key(0))
    golden = {"resta": lambda b, ft, al: f32(ft) + 0.5 * (f32(al) - f32(b)),
              "safe_lora": lambda b, ft, al: np_safe_lora(b, ft, al, 0.9),
              "safemerge": lambda b, ft, al: np_safemerge(b, ft, al, 0.9, 0.5)}[method]
    close(got["w"], golden(b2, ft2, al2))
    close(got["n"], golden(b1, ft1, al1))
