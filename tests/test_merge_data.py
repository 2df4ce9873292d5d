"""Golden tests of the data-driven closed forms (fisher) against numpy of the papers' formulas."""

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
