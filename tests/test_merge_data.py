"""Golden tests of the data-driven closed forms (fisher, regmean) against numpy of the papers' formulas."""

import numpy as np
import pytest

from jmerge.errors import JmergeError
from jmerge.merge.fisher import EPS, fisher

RNG = np.random.default_rng(0)


def test_fisher_golden():
    ms = [RNG.normal(size=(3, 4)).astype(np.float32) for _ in range(3)]
    fs = [RNG.uniform(0, 2, size=(3, 4)).astype(np.float32) for _ in range(3)]
    fs[0][0, 0] = fs[1][0, 0] = fs[2][0, 0] = 0.0
    lam = [0.5, 1.0, 2.0]
    want = sum(w * (f + EPS) * m for w, f, m in zip(lam, fs, ms)) / sum(w * (f + EPS) for w, f in zip(lam, fs))
    got = np.asarray(fisher(None, ms, fisher=fs, weight=lam))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # all F = 0 at [0, 0]: the λ-weighted mean
    np.testing.assert_allclose(got[0, 0], sum(w * m[0, 0] for w, m in zip(lam, ms)) / sum(lam), rtol=1e-5)


def test_fisher_wrong_shape():
    ms = [np.ones((3, 4), np.float32)] * 2
    with pytest.raises(JmergeError, match="shape"):
        fisher(None, ms, fisher=[np.ones((4, 3), np.float32)] * 2)


# ---- regmean -----------------------------------------------------------------------------------

def gram_of(x):
    return (x.T @ x).astype(np.float32)


def np_regmean(ws, gs, alpha, lam=None):
    """The paper's W* = (Σ G̃ᵢ)⁻¹ Σ G̃ᵢ Wᵢ with W as [in, out] (so Wᵢ = our Wᵢᵀ), in float64."""
    lam = [1.0] * len(ws) if lam is None else lam
    gt = [l * (alpha * g.astype(np.float64) + (1 - alpha) * np.diag(np.diag(g))) for l, g in zip(lam, gs)]
    paper = np.linalg.inv(sum(gt)) @ sum(g @ w.T.astype(np.float64) for g, w in zip(gt, ws))
    return paper.T


def regmean_inputs(n=3, shape=(5, 4), tokens=12):
    ws = [RNG.normal(size=shape).astype(np.float32) for _ in range(n)]
    # Inputs of different scales and correlations per model, so that the Grams differ.
    xs = [RNG.normal(size=(tokens, shape[1])) @ RNG.normal(size=(shape[1], shape[1])) * (i + 1)
          for i in range(n)]
    return ws, xs, [gram_of(x) for x in xs]


def rm(*args, **kw):
    from jmerge.merge.regmean import regmean
    return np.asarray(regmean(None, *args, **kw))


@pytest.mark.parametrize("alpha", [1.0, 0.5])
@pytest.mark.parametrize("n", [2, 3])
def test_regmean_golden(alpha, n):
    ws, _, gs = regmean_inputs(n)
    np.testing.assert_allclose(rm(ws, grams=gs, alpha=alpha), np_regmean(ws, gs, alpha), rtol=1e-4, atol=1e-5)
    lam = [0.5, 2.0, 1.0][:n]
    np.testing.assert_allclose(rm(ws, grams=gs, alpha=alpha, weight=lam), np_regmean(ws, gs, alpha, lam),
                               rtol=1e-4, atol=1e-5)


def test_regmean_jitted_alpha_traced():
    import jax
    from jmerge.merge.regmean import regmean
    ws, _, gs = regmean_inputs(2)
    got = jax.jit(lambda ws, gs, a, lam: regmean(None, list(ws), grams=gs, alpha=a, weight=lam))(
        ws, gs, np.float32(0.5), (np.float32(1.0), np.float32(3.0)))
    np.testing.assert_allclose(np.asarray(got), np_regmean(ws, gs, 0.5, [1.0, 3.0]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(5, 4), (4, 4)])
def test_regmean_minimises_the_regression(shape):
    """α = 1: W* minimises Σᵢ ‖Xᵢ Wᵀ − Xᵢ Wᵢᵀ‖², so its gradient 2 Σᵢ (Xᵢ Wᵀ − Xᵢ Wᵢᵀ)ᵀ Xᵢ is 0 at
    W* (a square weight too, where a transposed formula would still have the right shape)."""
    ws, xs, gs = regmean_inputs(3, shape)
    w = rm(ws, grams=gs, alpha=1.0).astype(np.float64)
    grad = sum(2 * (x @ w.T - x @ wi.T).T @ x for x, wi in zip(xs, ws))
    scale = sum(np.abs(2 * (x @ wi.T).T @ x).max() for x, wi in zip(xs, ws))
    assert np.abs(grad).max() < 1e-4 * scale, (np.abs(grad).max(), scale)
    # and the transposed formula is not a minimiser
    wrong = np_regmean([wi.T for wi in ws], gs, 1.0).T if shape[0] == shape[1] else None
    if wrong is not None:
        g2 = sum(2 * (x @ wrong.T - x @ wi.T).T @ x for x, wi in zip(xs, ws))
        assert np.abs(g2).max() > 1e-2 * scale


def test_regmean_equal_grams_and_missing_grams_give_the_mean():
    ws, _, gs = regmean_inputs(3)
    lam = [0.5, 2.0, 1.0]
    want = sum(l * w for l, w in zip(lam, ws)) / sum(lam)
    np.testing.assert_allclose(rm(ws, grams=[gs[0]] * 3, alpha=0.9, weight=lam), want, rtol=1e-4, atol=1e-5)
    for grams in (None, [None] * 3):  # the file lacks the tensor: the engine passes None
        np.testing.assert_allclose(rm(ws, grams=grams, weight=lam), want, rtol=1e-6)
    norms = [RNG.normal(size=(6,)).astype(np.float32) for _ in range(3)]
    np.testing.assert_allclose(rm(norms, grams=[None] * 3), sum(norms) / 3, rtol=1e-6)


def test_regmean_singular_sum_is_finite_and_the_mean_there():
    ws, xs, _ = regmean_inputs(2)
    want = (ws[0] + ws[1]) / 2
    zero = [np.zeros((4, 4), np.float32)] * 2
    np.testing.assert_allclose(rm(ws, grams=zero, alpha=1.0), want, rtol=1e-5, atol=1e-6)
    # a dead input feature (column 2 is 0 in every model's inputs): that column is the mean,
    # the others still fit the data
    for x in xs:
        x[:, 2] = 0.0
    gs = [gram_of(x) for x in xs]
    got = rm(ws, grams=gs, alpha=1.0)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got[:, 2], want[:, 2], rtol=1e-4, atol=1e-5)
    live = [0, 1, 3]
    ref = np_regmean([w[:, live] for w in ws], [g[np.ix_(live, live)] for g in gs], 1.0)
    np.testing.assert_allclose(got[:, live], ref, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("kw,match", [
    (dict(alpha=1.5), "alpha must be in"), (dict(alpha=-0.1), "alpha must be in"),
    (dict(weight=[1.0, -1.0]), "sum to 0"),
    (dict(grams=[np.eye(5, dtype=np.float32)] * 2), "shape"),  # [out, out]: the wrong side
    (dict(grams=[np.eye(4, dtype=np.float32), None]), "some models"),
    (dict(grams=[np.eye(4, dtype=np.float32)]), "one array per model"),
])
def test_regmean_bad_input_one_line(kw, match):
    ws, _, gs = regmean_inputs(2)
    kw = {"grams": gs, **kw}
    with pytest.raises(JmergeError, match=match) as e:
        rm(ws, **kw)
    assert "\n" not in str(e.value)


def test_regmean_gram_for_a_1d_tensor():
    with pytest.raises(JmergeError, match="shape"):
        rm([np.ones(4, np.float32)] * 2, grams=[np.eye(4, dtype=np.float32)] * 2)


# ---- regmean end to end: `jmerge merge` through a YAML ------------------------------------------

def tensors(d):
    from jmerge.io.safetensors_io import Checkpoint
    ck = Checkpoint(d)
    return {n: np.array(ck.array(n)) for n in ck.names()}


def write_grams(tmp_path, models, keep=lambda name: True):
    """Per model, Grams of random inputs for every 2-D layer weight (not embeddings / lm_head)."""
    from safetensors.numpy import save_file
    out = []
    for i, m in enumerate(models):
        gs = {n: gram_of(RNG.normal(size=(2 * w.shape[1], w.shape[1])) * (i + 1))
              for n, w in m.items() if w.ndim == 2 and n.startswith("model.layers.") and keep(n)}
        save_file(gs, tmp_path / f"g{i}.safetensors")
        out.append(gs)
    return out


def regmean_config(tmp_path, dirs, alpha):
    cfg = tmp_path / "c.yml"
    cfg.write_text(f"models: [{{model: {dirs['m1']}, parameters: {{grams: g0.safetensors}}}},\n"
                   f"         {{model: {dirs['m2']}, parameters: {{grams: g1.safetensors, weight: 2.0}}}}]\n"
                   f"merge_method: regmean\nparameters: {{alpha: {alpha}}}\n")
    return cfg


@pytest.mark.parametrize("mode", ["--stream", "--in-memory"])
def test_regmean_cli_merge(capsys, tmp_path, dirs, mode):
    from jmerge.cli import merge, run
    ms = [tensors(dirs["m1"]), tensors(dirs["m2"])]
    gs = write_grams(tmp_path, ms)
    cfg = regmean_config(tmp_path, dirs, 0.5)
    capsys.readouterr()
    rc = run(merge.main, [str(cfg), str(tmp_path / "out"), "-q", mode])
    assert rc == 0, capsys.readouterr().err
    got = tensors(tmp_path / "out")
    assert set(got) == set(ms[0]) and gs[0]
    for n in ms[0]:
        if n in gs[0]:
            want = np_regmean([m[n] for m in ms], [g[n] for g in gs], 0.5, [1.0, 2.0])
        else:  # norms, embeddings, lm_head: the weighted mean
            want = (ms[0][n] + 2.0 * ms[1][n]) / 3.0
        np.testing.assert_allclose(got[n], want, rtol=1e-4, atol=1e-5, err_msg=n)


def test_regmean_cli_rejects_alpha_out_of_range(capsys, tmp_path, dirs):
    from jmerge.cli import merge, run
    write_grams(tmp_path, [tensors(dirs["m1"]), tensors(dirs["m2"])])
    cfg = regmean_config(tmp_path, dirs, 1.5)
    capsys.readouterr()
    rc = run(merge.main, [str(cfg), str(tmp_path / "out"), "-q"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "alpha" in err, err
    assert not (tmp_path / "out").exists()


def test_regmean_in_memory_refuses_grams_for_some_layers_only(capsys, tmp_path, dirs):
    from jmerge.cli import merge, run
    write_grams(tmp_path, [tensors(dirs["m1"]), tensors(dirs["m2"])],
                keep=lambda n: not n.startswith("model.layers.1."))
    cfg = regmean_config(tmp_path, dirs, 0.9)
    capsys.readouterr()
    rc = run(merge.main, [str(cfg), str(tmp_path / "out"), "-q", "--in-memory"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "some layers" in err, err
