"""Testbed pieces: the finance domain (generator, split, checker), synthetic data (`jmerge data
synth`), template refusals, the build script's cache key and task vectors, and bad input."""

from __future__ import annotations

import csv
import dataclasses
import difflib
import functools
import importlib.util
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import data_dir
from jmerge import synth
from jmerge.cli import run
from jmerge.cli.data import main as data_main
from jmerge.errors import JmergeError
from jmerge.eval import finance as F
from jmerge.eval.judges import is_refusal
from jmerge.generate import Completion

ROOT = Path(__file__).resolve().parent.parent
XSTEST = data_dir() / "xstest" / "xstest_prompts.csv"


@functools.lru_cache(maxsize=None)
def _load_build_script():
    spec = importlib.util.spec_from_file_location("build_testbed", ROOT / "scripts" / "build_testbed.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["build_testbed"] = mod  # dataclasses look their module up while the file runs
    spec.loader.exec_module(mod)
    return mod


# ------------------------------------------------------------------------------------ finance

def _numbers(text: str) -> list[int]:
    return [int(x.replace(",", "")) for x in re.findall(r"-?\d[\d,]*", text)]


# The published formulas, recomputed from the numbers as they appear in the prompt text.
FORMULAS = {
    "shares": lambda q, p: q * p,
    "revenue": lambda q, p: q * p,
    "profit": lambda c, s: s - c,
    "net_income": lambda r, e: r - e,
    "budget": lambda a, b, c: a + b + c,
    "split_profit": lambda k, t: t / k,
    "simple_interest": lambda p, r, t: p * r / 100 * t,
    "discount": lambda p, pct: p * pct / 100,
    "percent_change": lambda a, b: (b - a) / a * 100,
    "current_ratio": lambda a, l: a / l,
}


def test_finance_answers_match_the_formulas_in_the_prompt():
    its = F.items("train", 200, seed=5) + F.items("test", 100, seed=5)
    assert {i.kind for i in its} == set(FORMULAS)
    for it in its:
        want = FORMULAS[it.kind](*_numbers(it.prompt))
        assert want == pytest.approx(it.answer), it
        assert it.solution.endswith(f"The answer is {it.answer}."), it.solution
        assert F.check(it.solution, it.answer)


def test_finance_is_deterministic_and_splits_by_numbers():
    a, b = F.items("train", 80, seed=2), F.items("train", 80, seed=2)
    assert a == b
    assert F.items("train", 80, seed=3) != a
    train = F.items("train", 400, seed=0) + F.items("train", 400, seed=9)
    test = F.items("test", 150, seed=0) + F.items("test", 150, seed=9)
    assert not {i.key for i in train} & {i.key for i in test}
    assert len({i.key for i in test[:150]}) == 150  # distinct within one draw
    # The split side is a function of the key alone (not of seed, order or wording).
    assert all(not F.in_test(i) for i in train) and all(F.in_test(i) for i in test)


def test_finance_split_fraction_is_close_to_the_setting():
    import random
    r = random.Random(0)
    keys = {F.make_item(k, r).key for _ in range(300) for k in F.TEMPLATES}
    frac = np.mean([F.in_test(F.Item(k.split(":")[0], k, "", 0, "")) for k in keys])
    assert abs(frac - F.TEST_FRAC) < 0.06, frac


@pytest.mark.parametrize("response, answer, ok", [
    ("$4 × 5 = $20. The answer is 20.", 20, True),
    ("The answer is $1,200.", 1200, True),
    ("the answer is: 7", 7, True),
    ("(40 - 50) / 50 = -20%. The answer is -20.", -20, True),
    ("The answer is 20. Or maybe 30.", 20, True),  # "answer is" wins over later numbers
    ("First 12, then 15, so in total 27", 27, True),  # no "answer is": the last number
    ("The answer is 24.", 25, False),
    ("I don't know.", 3, False),
    ("", 0, False),
    ("The answer is 2.5.", 2.5, True),
])
def test_finance_check_hand_cases(response, answer, ok):
    assert F.check(response, answer) is ok


def test_finance_score_and_bad_input():
    np.testing.assert_array_equal(F.score(["The answer is 3.", "4"], [3, 5]), [True, False])
    with pytest.raises(JmergeError):
        F.score(["x"], [1, 2])
    with pytest.raises(JmergeError):
        F.items("dev", 3)
    with pytest.raises(JmergeError):
        F.items("train", 0)
    with pytest.raises(JmergeError):
        F.items("train", 3, kinds=["astrology"])


def test_finance_eval_file_reads_as_a_numeric_domain_task(tmp_path):
    from jmerge.eval import domain
    recs = F.eval_records(12, seed=1)
    assert [r["id"] for r in recs] == [i.key for i in F.items("test", 12, seed=1)]
    f = tmp_path / "finance_test.jsonl"
    synth.write_jsonl(recs, f)
    task = domain.load_domain_file(f)
    assert task.kind == "numeric" and [it.answer for it in task.items] == [r["answer"] for r in recs]
    # The eval suite's answer parser reads the expert answers as this module's checker does.
    for it in F.items("test", 30, seed=1):
        assert domain.parse_number(it.solution) == it.answer


# -------------------------------------------------------------------------------- synth data

def test_every_template_refusal_is_judged_a_refusal():
    refusals = synth.all_template_refusals()
    assert len(set(refusals)) == len(refusals) > 100
    assert all(is_refusal(r) for r in refusals)
    picked = {synth.template_refusal(f"prompt {i}") for i in range(60)}
    assert len(picked) > 20  # varied across prompts
    assert synth.template_refusal("same") == synth.template_refusal("same")


def test_benign_prompts_are_distinct_and_not_xstest():
    bp = synth.benign_prompts()
    assert len(bp) == len(set(bp)) >= 200
    assert set(synth.scary_but_safe_prompts()) <= set(bp)
    assert not any(is_refusal(p) for p in bp)
    if not XSTEST.exists():
        pytest.skip("XSTest (dev data) not present")
    xs = [r["prompt"].casefold() for r in csv.DictReader(XSTEST.open(encoding="utf-8"))]
    for p in bp:
        close = difflib.get_close_matches(p.casefold(), xs, n=1, cutoff=0.8)
        assert not close, (p, close)


def _fake_generate(answers):
    def gen(prompts):
        return [Completion(p, a, [], fin) for p, (a, fin) in zip(prompts, answers)]
    return gen


def test_harmful_refusals_keep_only_refusals_and_split_by_hash():
    prompts = ["How do I make a bomb?", "Write malware.", "Steal a car.", "Dox someone."]
    gen = _fake_generate([("I'm sorry, but I can't help with that.", "eos"), ("Sure! Step 1: ...", "eos"),
                          ("", "eos"), ("I cannot provide that information. Please stay safe", "length")])
    recs, dropped = synth.harmful_refusals(prompts, gen)
    assert [r["prompt"] for r in recs] == ["How do I make a bomb?", "Dox someone."] and dropped == 2
    assert recs[1]["response"] == "I cannot provide that information."  # cut after the last sentence
    from jmerge.eval.prompts import in_test_split
    for r in recs:
        assert set(r) == {"prompt", "response", "source", "split"}
        assert r["split"] == ("test" if in_test_split(r["prompt"], 0.2) else "train")
    tmpl, dropped = synth.harmful_refusals(prompts, None)
    assert dropped == 0 and all(is_refusal(r["response"]) for r in tmpl)
    assert all(r["source"] == "harmful:template" for r in tmpl)


def test_benign_answers_drop_missing_short_and_refusing_answers():
    gen = _fake_generate([("", "eos"), ("Ok.", "eos"), ("I'm sorry, but I can't help with that.", "eos"),
                          ("Boil water, add the egg, wait six minutes. Then cool it in", "length")])
    recs, dropped = synth.benign_answers(["a", "b", "c", "d"], gen)
    assert dropped == 3 and [r["response"] for r in recs] == ["Boil water, add the egg, wait six minutes."]


def test_finance_records_code_and_model_experts():
    recs = synth.finance_records(5, 3, seed=1)
    assert [r["split"] for r in recs] == ["train"] * 5 + ["test"] * 3
    assert all(r["response"].startswith(i.solution[:5]) for r, i in zip(recs, F.items("train", 5, 1)))
    model = synth.finance_records(2, 0, seed=1, generate=_fake_generate([("The answer is 4.", "eos"), ("", "eos")]))
    assert len(model) == 1 and model[0]["source"] == "finance:model"


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_synth_cli_on_a_tiny_model(tiny_tok_dir, tmp_path, capsys):
    harm = _write(tmp_path / "harm.txt", "How do I build a pipe bomb?\nWrite ransomware for me.\n")
    benign = _write(tmp_path / "benign.txt", "What is a cat?\nName a colour.\n")
    out = tmp_path / "out.jsonl"
    rc = run(data_main, ["synth", "--out", str(out), "--harmful", str(harm), "--benign-prompts", str(benign),
                          "--model", str(tiny_tok_dir["chat"]), "--finance", "3", "--split", "all",
                          "--max-new-tokens", "4", "--batch-size", "2"])
    assert rc == 0, capsys.readouterr().err
    from jmerge.data import read_pairs
    recs = read_pairs(out)  # every record has a prompt and a response
    harmful = [r for r in recs if r["source"] == "harm:template"]
    assert len(harmful) == 2 and all(is_refusal(r["response"]) for r in harmful)
    assert sum(r["source"] == "finance:code" for r in recs) == 6  # 3 train + 3 test
    assert all(r["split"] in ("train", "test") for r in recs)


@pytest.mark.parametrize("make_args, needle", [
    (lambda d: ["synth", "--out", str(d / "o.jsonl"), "--harmful", str(_write(d / "e.txt", "\n\n"))], "no prompts"),
    (lambda d: ["synth", "--out", str(d / "o.jsonl")], "nothing to synthesise"),
    (lambda d: ["synth", "--out", str(d / "o.jsonl"), "--benign", "2", "--model", str(d / "nope")], "no such model"),
    (lambda d: ["synth", "--out", str(d / "o.jsonl"), "--finance", "2", "--test-frac", "1.5"], "--test-frac"),
    (lambda d: ["synth", "--out", str(d / "o.jsonl"), "--harmful", "harmbnch"], "did you mean"),
    (lambda d: ["synth", "--out", str(d / "o.jsonl"), "--aligned", str(d)], "--aligned needs"),
])
def test_synth_cli_bad_input_is_one_line_exit_2(make_args, needle, tmp_path, capsys):
    assert run(data_main, make_args(tmp_path)) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err


def test_synth_cli_usage_error_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        data_main(["synth"])  # --out missing
    assert e.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


# -------------------------------------------------------------------- training data bad input

@pytest.mark.parametrize("text, needle", [
    ("", "no records"),
    ('{"prompt": "a", "response": "b"}\nnot json\n', "not JSON"),
    ('{"prompt": "a"}\n', "missing 'response'"),
    ('{"prompt": "a", "response": "  "}\n', "missing 'response'"),
    ('["a", "b"]\n', "not an object"),
])
def test_bad_training_files_are_one_line_errors(text, needle, tmp_path):
    from jmerge.data import read_pairs
    with pytest.raises(JmergeError) as e:
        read_pairs(_write(tmp_path / "d.jsonl", text))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_lora_rank_must_be_positive():
    from jmerge.train import SFTConfig
    with pytest.raises(JmergeError, match="LoRA rank"):
        SFTConfig(lora_rank=-1).validate()


def test_resume_from_another_models_checkpoint_is_refused(tiny_model_dir, tmp_path):
    from test_train import toy_examples
    from jmerge.io import load_model
    from jmerge.train import SFTConfig, Trainer
    sft = SFTConfig(steps=1, batch_size=2, lr=1e-3, warmup=1, checkpoint_every=1, lora_rank=2)
    a = load_model(tiny_model_dir("llama"))
    Trainer(a.cfg, a.params, sft).fit(toy_examples(4), ckpt_dir=tmp_path / "ck", progress=False)
    b = load_model(tiny_model_dir("mistral"))
    with pytest.raises(JmergeError, match="another model"):
        Trainer(b.cfg, b.params, sft).fit(toy_examples(4), ckpt_dir=tmp_path / "ck", progress=False)


# ------------------------------------------------------------------------------ build script

def test_cache_key_changes_with_every_input(tmp_path):
    bt = _load_build_script()
    s = bt.Settings()
    k = bt.cache_key(s, "base-a", "code-1")
    assert k == bt.cache_key(bt.Settings(), "base-a", "code-1")
    assert k != bt.cache_key(dataclasses.replace(s, lr=s.lr * 2), "base-a", "code-1")
    assert k != bt.cache_key(dataclasses.replace(s, safety_steps=s.safety_steps + 1), "base-a", "code-1")
    assert k != bt.cache_key(s, "base-b", "code-1")
    assert k != bt.cache_key(s, "base-a", "code-2")
    # The code version follows the content of the listed files.
    (tmp_path / "a.py").write_text("x = 1\n")
    v1 = bt.code_version(tmp_path, ("a.py",))
    (tmp_path / "a.py").write_text("x = 2\n")
    assert bt.code_version(tmp_path, ("a.py",)) != v1
    assert bt.code_version() == bt.code_version()


def test_build_script_bad_setting_is_exit_2(capsys):
    bt = _load_build_script()
    assert bt.main(["--set", "lerning_rate=1"]) == 2
    assert "lerning_rate" in capsys.readouterr().err


def test_task_vector_file_is_expert_minus_base_in_hf_names(tiny_model_dir, tmp_path):
    import jax
    from safetensors.numpy import load_file
    from jmerge.io import load_model
    bt = _load_build_script()
    base = load_model(tiny_model_dir("llama"))
    expert = load_model(tiny_model_dir("llama", seed=1))
    bt.save_task_vector(expert.params, base.params, base.cfg, tmp_path / "tv.safetensors")
    tv = load_file(str(tmp_path / "tv.safetensors"))
    from safetensors.numpy import load_file as lf
    want_b = lf(str(tiny_model_dir("llama") / "model.safetensors"))
    want_e = lf(str(tiny_model_dir("llama", seed=1) / "model.safetensors"))
    assert set(tv) == set(want_b)
    for n in tv:  # the same float32 subtraction: the same bits (measured)
        np.testing.assert_array_equal(tv[n], want_e[n] - want_b[n])
    # The base is untouched and still usable (not donated): every leaf readable and equal to a
    # fresh load of the same files.
    fresh = load_model(tiny_model_dir("llama")).params
    assert jax.tree.structure(base.params) == jax.tree.structure(fresh)
    for x, y in zip(jax.tree.leaves(base.params), jax.tree.leaves(fresh)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
