"""Bad search inputs end `python -m jmerge.search` with one line on stderr and exit 2, before
any model is loaded and before anything is written: every numeric setting checked for kind and
range at parse time, the YAML and JSONL files read safely, damaged checkpoints named with the
way to start over."""

import json
import os
import shutil

import pytest
import yaml

from conftest import write_search_data

from jmerge.cli import run
from jmerge.errors import JmergeError
from jmerge.search import config as C
from jmerge.cli.search import main

MISSING = "/nonexistent/jmerge-test-model"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Real data and eval files (only the models are missing from the table's config)."""
    d = tmp_path_factory.mktemp("badcfg")
    write_search_data(d, 4)
    (d / "harmful.txt").write_text("how do I make a weapon\nhow do I steal a car\n")
    (d / "items.jsonl").write_text("".join(json.dumps({"question": f"What is {i} plus 3?", "answer": i + 3}) + "\n"
                                           for i in range(2)))
    return d


def config(d, base=MISSING, experts=(MISSING + "-a", MISSING + "-b")) -> dict:
    """Every search on, every value valid."""
    return {
        "base": str(base),
        "experts": {"safety": str(experts[0]), "domain": str(experts[1])},
        "data": {"safety": {"path": str(d / "safety.jsonl"), "weight": 1.0},
                 "domain": {"path": str(d / "domain.jsonl"), "weight": 0.5}},
        "max_len": 48,
        "checkpoint_every": 1,
        "searches": {
            "coefficients": {"steps": 2, "batch_size": 2},
            "masks": {"steps": 2, "batch_size": 2, "safe": "safety"},
            "evolve": {"method": "ties", "generations": 1, "popsize": 3, "batches": 1, "batch_size": 2},
            "cocktail": {"batches": 1, "batch_size": 2},
            "sweep": {"alpha": [0.5, 1.0], "beta": [0.5]},
        },
        "eval": {"suites": ["safety", "domain"], "limit": 2, "max_new_tokens": 2, "batch_size": 2,
                 "harmful": str(d / "harmful.txt"), "domain": str(d / "items.jsonl")},
        "out": str(d / "out"),
    }


def dump(cfg: dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=False)  # the experts' order is meaningful


def put(cfg: dict, key: str, value) -> None:
    *parents, last = key.split(".")
    for p in parents:
        cfg = cfg.setdefault(p, {})
    cfg[last] = value


@pytest.fixture
def no_model_load(monkeypatch):
    """A load of any model fails the test loudly (not as a JmergeError, which would pass)."""
    def refuse(*a, **kw):
        raise AssertionError("a model was loaded before the bad input was reported")
    monkeypatch.setattr("jmerge.io.load_model", refuse)


def run_cli(path, capsys):
    rc = run(main, ["--config", str(path), "-q"])
    out, err = capsys.readouterr()
    return rc, out, err.strip()


def assert_one_line(rc, out, err, needle):
    assert rc == 2, (rc, err)
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert needle in err, err
    assert "loading base" not in out


NAN, INF = float("nan"), float("inf")
# (dotted key, bad value, what the error line must say)
BAD = [
    ("checkpoint_every", 0, "checkpoint_every: expected a positive whole number, got 0"),
    ("checkpoint_every", -3, "checkpoint_every: expected a positive whole number, got -3"),
    ("checkpoint_every", 2.5, "checkpoint_every: expected a positive whole number, got 2.5"),
    ("checkpoint_every", True, "checkpoint_every: expected a positive whole number, got true"),
    ("checkpoint_every", "ten", "checkpoint_every: expected a positive whole number, got the string 'ten'"),
    ("seed", -1, "seed: expected a whole number >= 0, got -1"),
    ("seed", 2**40, "seed: expected a whole number >= 0 no larger than 2147483647"),
    ("max_len", 0, "max_len: expected a positive whole number, got 0"),
    ("max_len", [48], "max_len: expected a positive whole number, got a list"),
    ("dtype", "float64", "dtype: expected float32 or bfloat16 or float16, got 'float64'"),
    ("mesh", 4, "mesh: expected axis sizes"),
    ("data.safety.weight", -1, "data.safety.weight: expected a number >= 0, got -1"),
    ("data.safety.weight", NAN, "data.safety.weight: expected a number >= 0, got .nan"),
    ("data.safety.weight", INF, "data.safety.weight: expected a number >= 0, got .inf"),
    ("data.safety.weight", True, "data.safety.weight: expected a number >= 0, got true"),
    ("data.safety.weight", "heavy", "data.safety.weight: expected a number >= 0, got the string 'heavy'"),
    ("data.domain.tokens", 0, "data.domain.tokens: expected a positive whole number of answer tokens, got 0"),
    ("data.domain.tokens", 2.5, "data.domain.tokens: expected a positive whole number of answer tokens, got 2.5"),
    ("data.domain.path", 3, "data.domain.path: expected a path, got 3"),
    ("data.domain.wieght", 1, "data.domain: unknown key 'wieght' (did you mean 'weight'?)"),
    ("searches.coefficients.lr", NAN, "searches.coefficients.lr: expected a number > 0, got .nan"),
    ("searches.coefficients.lr", -0.1, "searches.coefficients.lr: expected a number > 0, got -0.1"),
    ("searches.coefficients.lr", 0, "searches.coefficients.lr: expected a number > 0, got 0"),
    ("searches.coefficients.lr", INF, "searches.coefficients.lr: expected a number > 0, got .inf"),
    ("searches.coefficients.lr", False, "searches.coefficients.lr: expected a number > 0, got false"),
    ("searches.coefficients.lr", None, "searches.coefficients.lr: expected a number > 0, got null"),
    ("searches.coefficients.steps", 0, "searches.coefficients.steps: expected a positive whole number, got 0"),
    ("searches.coefficients.steps", 1.5, "searches.coefficients.steps: expected a positive whole number, got 1.5"),
    ("searches.coefficients.steps", 10**12, "searches.coefficients.steps: expected a positive whole number no larger"),
    ("searches.coefficients.steps", "10", "searches.coefficients.steps: '10' is a string"),
    ("searches.coefficients.batch_size", -2, "searches.coefficients.batch_size: expected a positive whole number"),
    ("searches.coefficients.init", NAN, "searches.coefficients.init: expected a finite number, got .nan"),
    ("searches.coefficients.init", 2.0, "searches.coefficients.init: 2.0 lies outside clamp [0.0, 1.0]"),
    ("searches.coefficients.clamp", [1.0, 0.0], "searches.coefficients.clamp: low must be below high"),
    ("searches.coefficients.clamp", [0.0], "searches.coefficients.clamp: expected [low, high], got a list"),
    ("searches.coefficients.clamp", [0.0, NAN], "searches.coefficients.clamp[1]: expected a finite number"),
    ("searches.coefficients.warmup", -1, "searches.coefficients.warmup: expected a whole number >= 0, got -1"),
    ("searches.coefficients.beta", 0, "searches.coefficients.beta: expected a number > 0, got 0"),
    ("searches.coefficients.granularity", "layers", "searches.coefficients.granularity: expected layer or "
                                                    "layer_module, got 'layers' (did you mean 'layer'?)"),
    ("searches.coefficients.transform", "sigmoid", "searches.coefficients.transform: expected identity"),
    ("searches.coefficients.stpes", 3, "searches.coefficients: unknown key 'stpes' (did you mean 'steps'?)"),
    ("searches.masks.temperature", 0, "searches.masks.temperature: expected a number > 0, got 0"),
    ("searches.masks.temperature", -0.5, "searches.masks.temperature: expected a number > 0, got -0.5"),
    ("searches.masks.sparsity", -0.5, "searches.masks.sparsity: expected a number >= 0, got -0.5"),
    ("searches.masks.lam", NAN, "searches.masks.lam: expected a finite number, got .nan"),
    ("searches.masks.init", INF, "searches.masks.init: expected a finite number, got .inf"),
    ("searches.masks.lr", "fast", "searches.masks.lr: expected a number > 0, got the string 'fast'"),
    ("searches.masks.shared", "yes", "searches.masks.shared: expected true or false, got 'yes'"),
    ("searches.masks.export", "hard", "searches.masks.export: expected soft or threshold or sample, got 'hard'"),
    ("searches.masks.safe", "nobody", "searches.masks.safe: 'nobody' is not one of the experts (safety, domain)"),
    ("searches.evolve.generations", 0, "searches.evolve.generations: expected a positive whole number, got 0"),
    ("searches.evolve.popsize", 1, "searches.evolve.popsize: expected a whole number >= 2, got 1"),
    ("searches.evolve.sigma0", 0, "searches.evolve.sigma0: expected a number > 0, got 0"),
    ("searches.evolve.batches", 0, "searches.evolve.batches: expected a positive whole number, got 0"),
    ("searches.evolve.init", {"density": 1.5}, "searches.evolve.init.density: expected a number in [0, 1], got 1.5"),
    ("searches.evolve.init", {"densty": 0.5}, "searches.evolve.init: 'densty' is not a searched parameter "
                                              "(did you mean 'density'?)"),
    ("searches.evolve.params", ["density"], "searches.evolve.params: ties needs 'weight' searched"),
    ("searches.evolve.method", "tie", "searches.evolve.method: unknown merge method 'tie' (did you mean 'ties'?)"),
    ("searches.cocktail.temperature", 0, "searches.cocktail.temperature: expected a number > 0, got 0"),
    ("searches.cocktail.temperature", NAN, "searches.cocktail.temperature: expected a number > 0, got .nan"),
    ("searches.cocktail.batch_size", 0, "searches.cocktail.batch_size: expected a positive whole number, got 0"),
    ("searches.sweep.alpha", [], "searches.sweep.alpha: expected a non-empty list of numbers, got a list"),
    ("searches.sweep.alpha", [0.5, "x"], "searches.sweep.alpha[1]: expected a finite number, got the string 'x'"),
    ("searches.sweep.beta", NAN, "searches.sweep.beta: expected a non-empty list of numbers, got .nan"),
    ("searches.sweep.domain", "nobody", "searches.sweep.domain: 'nobody' is not one of the experts"),
    ("eval.limit", 0, "eval.limit: expected a positive whole number, got 0"),
    ("eval.limit", -1, "eval.limit: expected a positive whole number, got -1"),
    ("eval.limit", "all", "eval.limit: expected a positive whole number, got the string 'all'"),
    ("eval.max_new_tokens", 0, "eval.max_new_tokens: expected a positive whole number, got 0"),
    ("eval.max_new_tokens", INF, "eval.max_new_tokens: expected a positive whole number, got .inf"),
    ("eval.batch_size", 0, "eval.batch_size: expected a positive whole number, got 0"),
    ("eval.suites", ["safty"], "eval.suites: expected safety or overrefusal or domain, got 'safty' "
                               "(did you mean 'safety'?)"),
    ("eval.domain", None, "eval.domain: the domain suite needs a JSONL file of held-out items"),
]


@pytest.mark.parametrize("key,value,needle", BAD, ids=[f"{k}={v!r}" for k, v, _ in BAD])
def test_bad_value_is_one_line_before_any_model_loads(files, key, value, needle, capsys, no_model_load, tmp_path):
    cfg = config(files)
    cfg["out"] = str(tmp_path / "out")
    put(cfg, key, value)
    (tmp_path / "c.yaml").write_text(dump(cfg))
    rc, out, err = run_cli(tmp_path / "c.yaml", capsys)
    assert_one_line(rc, out, err, needle)
    assert str(tmp_path / "c.yaml") in err  # the line names the file
    assert not (tmp_path / "out").exists()


def test_the_table_config_is_valid_apart_from_its_missing_models(files, capsys, tmp_path):
    """So each case above fails on its own value: unchanged, the config passes every check and
    the data and eval files are read; the run stops only at the first missing model."""
    cfg = config(files)
    cfg["out"] = str(tmp_path / "out")
    assert C.parse(cfg).checkpoint_every == 1
    (tmp_path / "c.yaml").write_text(dump(cfg))
    rc, out, err = run_cli(tmp_path / "c.yaml", capsys)
    assert rc == 2 and err == f"jmerge: error: {MISSING}: no such file or directory", err
    assert "loading base" in out


def test_every_problem_of_the_file_at_once(files, capsys, no_model_load, tmp_path):
    cfg = config(files)
    put(cfg, "searches.coefficients.lr", -1)
    put(cfg, "eval.limit", 0)
    put(cfg, "data.safety.weight", NAN)
    put(cfg, "serches", {})
    (tmp_path / "c.yaml").write_text(dump(cfg))
    rc, out, err = run_cli(tmp_path / "c.yaml", capsys)
    assert_one_line(rc, out, err, "unknown key 'serches' (did you mean 'searches'?)")
    for key in ("searches.coefficients.lr:", "eval.limit:", "data.safety.weight:"):
        assert key in err, err


@pytest.mark.parametrize("text,needle", [
    ("1e308", "searches.coefficients.lr: '1e308' is a string: YAML 1.1 reads 1e308 as text; write 1.0e+308"),
    ("5e-3", "searches.coefficients.lr: '5e-3' is a string: YAML 1.1 reads 5e-3 as text; write 5.0e-3"),
    ("1.0e3", "searches.coefficients.lr: '1.0e3' is a string: YAML 1.1 reads 1.0e3 as text; write 1.0e+3"),
    (".nan", "searches.coefficients.lr: expected a number > 0, got .nan"),
    ("-.inf", "searches.coefficients.lr: expected a number > 0, got -.inf"),
    ("yes", "searches.coefficients.lr: expected a number > 0, got true"),
    ("'0.1'", "searches.coefficients.lr: '0.1' is a string, expected a number > 0; write the number without quotes"),
])
def test_numbers_as_yaml_writes_them(files, text, needle, capsys, no_model_load, tmp_path):
    """The YAML text itself (not a dumped dict): exponents without a dot or sign are strings to
    PyYAML, `.nan` and `yes` are a float and a bool."""
    cfg = config(files)
    put(cfg, "searches.coefficients.lr", "LR")
    (tmp_path / "c.yaml").write_text(dump(cfg).replace("lr: LR", f"lr: {text}"))
    rc, out, err = run_cli(tmp_path / "c.yaml", capsys)
    assert_one_line(rc, out, err, needle)


def test_a_yaml_1_1_float_is_read_as_a_number(files):
    cfg = config(files)
    put(cfg, "searches.coefficients.lr", "LR")
    text = dump(cfg).replace("lr: LR", "lr: 1.0e-3")
    assert C.parse(yaml.safe_load(text)).searches["coefficients"].lr == 1e-3


@pytest.mark.parametrize("content,needle", [
    (b"base: \xff\xfe\n", "search config is not UTF-8 text (byte 0xff at offset 6)"),
    (b"", "the config is empty"),
    (b"- base\n- out\n", "expected a mapping of settings, got a list"),
    (b"base: [unclosed\n", "YAML syntax error at line 2"),
    (b"base: !!python/object:os.system x\n", "YAML syntax error at line 1"),
    (b"base: a\x00b\n", "YAML syntax error"),
])
def test_unreadable_yaml_is_one_line(content, needle, capsys, tmp_path):
    (tmp_path / "c.yaml").write_bytes(content)
    rc, out, err = run_cli(tmp_path / "c.yaml", capsys)
    assert_one_line(rc, out, err, needle)
    assert str(tmp_path / "c.yaml") in err


def test_config_that_is_a_directory_or_missing(capsys, tmp_path):
    rc, out, err = run_cli(tmp_path, capsys)
    assert_one_line(rc, out, err, "is a directory, expected a search config")
    rc, out, err = run_cli(tmp_path / "none.yaml", capsys)
    assert_one_line(rc, out, err, "no such search config")


@pytest.mark.parametrize("content,needle", [
    (b'{"prompt": "a", "response": "b"}\n{"prompt": "\xff", "response": "b"}\n', "line 2: not UTF-8 text (byte 0xff"),
    (b'{"prompt": "a", "response": "b"}\n[1, 2]\n', "line 2: not an object (a JSON array)"),
    (b'"just text"\n', "line 1: not an object (a JSON string)"),
    (b'{"prompt": 3, "response": "b"}\n', "line 1: 'prompt' must be a string, got 3"),
    (b'{"prompt": "a", "response": NaN}\n', "line 1: not JSON (NaN is not valid JSON)"),
    (b'{"prompt": "a", "response": "b"\n', "line 1: not JSON (Expecting ',' delimiter"),
    (b"", "no records"),
    (b"\n\n", "no records"),
])
def test_bad_data_file_is_one_line_naming_file_and_line(files, content, needle, capsys, no_model_load, tmp_path):
    (tmp_path / "bad.jsonl").write_bytes(content)
    cfg = config(files)
    cfg["out"] = str(tmp_path / "out")
    put(cfg, "data.domain.path", str(tmp_path / "bad.jsonl"))
    (tmp_path / "c.yaml").write_text(dump(cfg))
    rc, out, err = run_cli(tmp_path / "c.yaml", capsys)
    assert_one_line(rc, out, err, needle)
    assert f"{tmp_path / 'bad.jsonl'}: " in err
    assert not (tmp_path / "out").exists()


def test_sft_settings_checked_together():
    from jmerge.train import SFTConfig
    with pytest.raises(JmergeError) as e:
        SFTConfig(lr=NAN, steps=0, weight_decay=-1.0, checkpoint_every=0).validate()
    msg = str(e.value)
    assert "\n" not in msg
    for needle in ("lr must be a finite number > 0, got nan", "steps must be a whole number >= 1, got 0",
                   "weight_decay must be a finite number >= 0, got -1.0", "checkpoint_every must be a whole number"):
        assert needle in msg, msg
    SFTConfig().validate()


# ------------------------------------------------------------------------- damaged checkpoints

@pytest.fixture(scope="module")
def checkpointed(files, tiny_tok_dir, tiny_model_dir, tmp_path_factory):
    """A 2-step coefficient search on tiny models, checkpointed each step; the pristine
    checkpoint folder is kept aside for each test to damage a copy of."""
    from jmerge.search.run import SearchRun
    d = tmp_path_factory.mktemp("ckpt")
    cfg = config(files, base=tiny_tok_dir["chat"], experts=(tiny_model_dir("llama", 1), tiny_model_dir("llama", 2)))
    cfg["searches"] = {"coefficients": {"steps": 2, "batch_size": 2}}
    cfg["max_len"] = 128  # the character-level tokenizer: no row is cut (a warning is a stderr line)
    cfg["eval"]["suites"] = ["safety"]
    cfg["out"] = str(d / "out")
    (d / "c.yaml").write_text(dump(cfg))
    job = SearchRun(C.load(d / "c.yaml"), progress=False)
    job.coefficients(job.c.searches["coefficients"])
    ck = d / "out" / "checkpoints" / "coefficients"
    assert sorted(p.name for p in ck.glob("step_*")) == ["step_00000001", "step_00000002"]
    shutil.copytree(ck, d / "pristine")
    return d, ck


def _files(step):
    return [p for p in step.rglob("*") if p.is_file()]


def _truncate(ck):
    for p in _files(ck / "step_00000002"):
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _garbage(ck):
    for p in _files(ck / "step_00000002"):
        p.write_bytes(os.urandom(max(p.stat().st_size, 8)))


@pytest.mark.parametrize("damage,needle", [
    (_truncate, "step_00000002: checkpoint cannot be restored"),
    (_garbage, "step_00000002: checkpoint cannot be restored"),
    (lambda ck: shutil.rmtree(ck / "step_00000002"), "step_00000002: checkpoint cannot be restored"),
    (lambda ck: (ck / "meta.json").write_text("[1, 2]"), "meta.json: checkpoint meta must be a JSON object, got array"),
    (lambda ck: (ck / "meta.json").write_text('{"fingerprint": "x", "step": "two"}'), "'step' must be a"),
    (lambda ck: (ck / "meta.json").write_bytes(b'{"step": \xff}'), "meta.json: checkpoint meta is not UTF-8 text"),
], ids=["truncated", "garbage", "step-missing", "meta-array", "meta-step-string", "meta-not-utf8"])
def test_damaged_checkpoint_is_one_line_saying_how_to_start_over(checkpointed, damage, needle, capsys):
    d, ck = checkpointed
    shutil.rmtree(ck)
    shutil.copytree(d / "pristine", ck)
    damage(ck)
    rc, out, err = run_cli(d / "c.yaml", capsys)
    assert rc == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert needle in err and f"the checkpoint is damaged: delete {ck} to start this run over" in err, err
    assert not (d / "out" / "report").exists() and not (d / "out" / "models").exists()


def test_an_intact_checkpoint_resumes(checkpointed):
    """The control for the damage cases: the pristine copy restores, at its last step."""
    from jmerge.search.run import SearchRun
    d, ck = checkpointed
    shutil.rmtree(ck)
    shutil.copytree(d / "pristine", ck)
    job = SearchRun(C.load(d / "c.yaml"), progress=False)
    job.coefficients(job.c.searches["coefficients"])
    assert job.logs["coefficients"] == []  # both steps came from the checkpoint, none was run


def test_role_baseline_needs_the_domain_and_safety_experts(files, capsys, no_model_load, tmp_path):
    """resta / safe_lora / safemerge take (domain fine-tune, safety-aligned model): experts named
    otherwise, with no sweep to name them, are one line before any model loads."""
    cfg = config(files)
    cfg["out"] = str(tmp_path / "out")
    cfg["searches"].pop("sweep")
    cfg["experts"] = {"med": cfg["experts"]["domain"], "safe": cfg["experts"]["safety"]}
    cfg["baselines"] = ["safe_lora"]
    (tmp_path / "c.yaml").write_text(dump(cfg))
    rc, out, err = run_cli(tmp_path / "c.yaml", capsys)
    assert_one_line(rc, out, err, "baselines: safe_lora merges the experts as (domain fine-tune, safety-aligned "
                                  "model), named by searches.sweep's domain / align ('domain', 'safety'); there is "
                                  "no expert 'domain'")
    cfg["searches"]["sweep"] = {"domain": "med", "align": "safe"}  # named: valid
    (tmp_path / "c.yaml").write_text(dump(cfg))
    rc, out, err = run_cli(tmp_path / "c.yaml", capsys)
    assert "baselines" not in err
