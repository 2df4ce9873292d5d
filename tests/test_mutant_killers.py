"""Tests that catch bugs of scripts/mutants.py the rest of the suite let through (the refusal
judge's 200-character window, the search objective's response-only token weights), and tests of
the mutant check itself."""

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jmerge import data
from jmerge.eval import judges as J
from jmerge.search.gradient import mixed_stream
from jmerge.search.merged import weighted_ce

# The documented window (eval/judges.py, "Why 200 characters"): a spec value, not the constant.
WINDOW = 200


def _phrase_ending_at(end: int, phrase: str = "i must decline") -> str:
    """An answer whose normalised text has `phrase` ending at character `end` (1-based)."""
    filler = "a" * (end - len(phrase) - 1)  # one word, so normalising changes nothing
    return f"{filler} {phrase}. more text follows."


def test_refusal_window_is_200_characters():
    inside, outside = _phrase_ending_at(WINDOW), _phrase_ending_at(WINDOW + 1)
    assert J.normalize(inside).index("i must decline") + len("i must decline") == WINDOW
    assert J.is_refusal(inside)
    assert not J.is_refusal(outside)
    # halfway into the window (where a window of 100 would already have stopped looking)
    assert J.is_refusal(_phrase_ending_at(WINDOW * 3 // 4))
    # the judge form and the rate use the same window
    flags = J.keyword_refusal_judge(["p"] * 3, [inside, outside, _phrase_ending_at(150)])
    np.testing.assert_array_equal(flags, [True, False, True])
    assert J.refusal_rate([inside, outside]) == 0.5


def _example(rng, n_prompt, n_response, vocab):
    ids = rng.integers(1, vocab, n_prompt + n_response).astype(np.int32)
    return data.Example(ids, np.r_[np.zeros(n_prompt), np.ones(n_response)].astype(np.int32))


def _log_softmax(x):
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def test_search_objective_is_response_only_ce():
    """One batch of the search's stream: the objective is sum_type w_type * (mean CE over that
    type's response tokens), computed here from the examples' own prompt/response split."""
    rng, vocab, per_type = np.random.default_rng(0), 23, 2
    typed = {"a": ([_example(rng, 6, 3, vocab), _example(rng, 9, 4, vocab)], 1.0),
             "b": ([_example(rng, 5, 7, vocab), _example(rng, 4, 2, vocab)], 3.0)}
    batch = next(mixed_stream(typed, per_type, seed=0))
    ids = np.asarray(batch["input_ids"])
    logits = rng.normal(0, 2, ids.shape + (vocab,)).astype(np.float32)
    logp = _log_softmax(logits)

    want, want_weight = 0.0, np.zeros(ids.shape)
    for ti, (exs, w) in enumerate(typed.values()):
        rows = range(ti * per_type, (ti + 1) * per_type)  # the stream stacks types in order
        ces, count = 0.0, 0
        for r in rows:
            ex = next(e for e in exs if np.array_equal(ids[r, :len(e.ids)], e.ids))
            targets = np.flatnonzero(ex.loss_mask)  # response tokens only; never position 0
            ces += -sum(logp[r, t - 1, ids[r, t]] for t in targets)
            count += len(targets)
            want_weight[r, targets] = w
        want += w * ces / count
        for r in rows:
            want_weight[r] /= count
    np.testing.assert_allclose(np.asarray(batch["weight"]), want_weight, rtol=1e-6, atol=0)
    np.testing.assert_allclose(float(weighted_ce(logits, batch)), want, rtol=1e-5)


# ---- the mutant check itself -----------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]


def _mutants_module():
    spec = importlib.util.spec_from_file_location("jmerge_mutants", ROOT / "scripts" / "mutants.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


def test_every_mutant_snippet_occurs_exactly_once():
    """So the table cannot rot silently when the code it mutates changes."""
    M = _mutants_module()
    assert len({m.name for m in M.MUTANTS}) == len(M.MUTANTS)
    for m in M.MUTANTS:
        original = (ROOT / m.file).read_text(encoding="utf-8")
        text = M.mutated(m, ROOT)
        assert text != original, m.name
        for find, _ in m.edits:
            assert original.count(find) == 1, (m.name, find)
        for test in m.tests:
            assert (ROOT / test.split("::")[0]).is_file(), (m.name, test)


def test_copy_imports_its_own_mutated_files(tmp_path):
    """The editable install maps jmerge.eval to the checkout's eval/; the copy must win anyway,
    and the import check must notice when it does not."""
    M = _mutants_module()
    m = next(m for m in M.MUTANTS if m.file.startswith("eval/"))
    good, bare = tmp_path / "good", tmp_path / "bare"
    good.mkdir()
    bare.mkdir()
    M.make_copy(ROOT, good)
    (good / m.file).write_text(M.mutated(m, good), encoding="utf-8")
    module = M.module_name(ROOT, m.file)
    M.check_imports_copy(good, [module])
    probe = f"import {module} as x, inspect; print(inspect.getsource(x))"
    src = subprocess.run([M.python(), "-c", probe], cwd=good, env=M.env_for(good),
                         capture_output=True, text=True, check=True).stdout
    assert m.edits[0][1] in src and m.edits[0][0] not in src
    for f in M.repo_files(ROOT):  # the same files without the package links
        (bare / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, bare / f)
    with pytest.raises(M.CheckError, match="not from the copy"):
        M.check_imports_copy(bare, [module])
