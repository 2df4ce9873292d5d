"""mergekit configs as mergekit reads them: parameters a method ignores (a warning), names no
method knows (an error, a warning with --lenient), `modules:`, `tokenizer.tokens` and
`residual_weight` checked against mergekit 0.1.5 itself; merge outputs checked for NaN/Inf; all-zero
normalized weights refused; `jmerge inspect` writes strict JSON."""

import json

import numpy as np
import pytest
import yaml

from conftest import copy_with_nan

from jmerge.cli import run
from jmerge.errors import JmergeError
from jmerge.io.safetensors_io import Checkpoint
from jmerge.engine import load_plan, parse_plan, resolve

LAYER = ["self_attn.q_proj.weight", "mlp.up_proj.weight"]
PRE, POST = ["model.embed_tokens.weight"], ["model.norm.weight", "lm_head.weight"]


pytestmark = pytest.mark.usefixtures("no_persistent_compile_cache")


def tensors(d):
    ck = Checkpoint(d)
    return {n: np.array(ck.array(n)) for n in ck.names()}


def cli(capsys, command, *args):
    from jmerge.cli import check, inspect, merge
    mains = {"merge": merge.main, "check": check.main, "inspect": inspect.main}
    capsys.readouterr()
    rc = run(mains[command], [str(a) for a in args])
    return rc, capsys.readouterr()


def one_line_error(rc, cap, needle, out=None):
    err = cap.err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert needle in err, err
    if out is not None:
        assert not out.exists()
        assert not list(out.parent.glob(f".{out.name}.*")), "temporary output left behind"


def jobs_of(text, layers, **kw):
    plan = parse_plan(yaml.safe_load(text), "cfg.yml", **kw)
    return plan, {j.out_name: j for j in resolve(plan, layers, LAYER, PRE, POST).jobs}


# ---- parameters a method ignores -------------------------------------------------------------

@pytest.mark.parametrize("method, base, params, ignored", [
    ("linear", False, "{weight: 1, density: 0.5}", ["density"]),
    ("linear", False, "{weight: 1, t: 0.3, rescale: true}", ["t", "rescale"]),
    ("model_stock", True, "{weight: 0.5}", ["weight"]),
    ("karcher", False, "{weight: 0.5, density: 0.2}", ["weight", "density"]),
    ("sce", True, "{weight: 1, epsilon: 0.1}", ["weight", "epsilon"]),
    ("nuslerp", False, "{weight: 0.5, lambda: 2, int8_mask: true}", ["lambda", "int8_mask"]),
    ("task_arithmetic", True, "{weight: 1, gamma: 0.1, nuslerp_flatten: false}", ["gamma", "nuslerp_flatten"]),
])
def test_ignored_parameter_one_warning_and_no_effect(method, base, params, ignored):
    head = f"merge_method: {method}\n" + ("base_model: b\n" if base else "")
    models = "models:\n  - {model: a, parameters: %s}\n  - {model: c, parameters: %s}\n" % (params, params)
    plan, jobs = jobs_of(head + models, {"a": 2, "b": 2, "c": 2})
    # one line per ignored name, naming it and the method, listing both places it is set
    assert len(plan.warnings) == len(ignored), plan.warnings
    for name, w in zip(ignored, plan.warnings):
        assert f"{name!r}" in w and f"merge_method {method}" in w and "models[0], models[1]" in w
    # the merge is the one written without the ignored names
    kept = yaml.safe_load(params)
    for name in ignored:
        del kept[name]
    flow = "{" + ", ".join(f"{k}: {json.dumps(v)}" for k, v in kept.items()) + "}"
    _, plain = jobs_of(head + models.replace(params, flow), {"a": 2, "b": 2, "c": 2})
    assert {n: j.params for n, j in jobs.items()} == {n: j.params for n, j in plain.items()}


def test_known_names_are_mergekits():
    """jmerge's list of mergekit parameter names is the one mergekit 0.1.5's registry gives."""
    import subprocess
    from mergekit_ref import mergekit_bin
    from jmerge.merge.registry import MERGEKIT_PARAMS
    code = ("from mergekit.merge_methods.registry import registered_methods as r; "
            "print(' '.join(sorted({p.name for m in r() for p in m.spec.parameters})))")
    py = mergekit_bin().parent / "python"
    names = subprocess.run([str(py), "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert set(names) == MERGEKIT_PARAMS


# ---- names no method knows -------------------------------------------------------------------

def test_unknown_parameter_error_did_you_mean_and_lenient(capsys, tmp_path, dirs):
    cfg = tmp_path / "c.yml"
    cfg.write_text(f"merge_method: linear\nmodels:\n  - {{model: {dirs['m1']}, parameters: {{weight: 1, densty: 0.5}}}}\n"
                   f"  - {{model: {dirs['m2']}, parameters: {{weight: 1}}}}\n")
    out = tmp_path / "out"
    rc, cap = cli(capsys, "merge", cfg, out, "-q")
    one_line_error(rc, cap, "unknown parameter 'densty'", out)
    assert "did you mean 'density'?" in cap.err and "--lenient" in cap.err
    rc, cap = cli(capsys, "check", cfg, "--no-scan")
    one_line_error(rc, cap, "did you mean 'density'?")

    rc, cap = cli(capsys, "check", cfg, "--no-scan", "--lenient")
    assert rc == 0 and cap.out.startswith("ok: linear"), cap.err
    assert [ln for ln in cap.err.splitlines() if "densty" in ln][0].startswith("warning: unknown parameter 'densty'")
    rc, cap = cli(capsys, "merge", cfg, out, "-q", "--lenient")
    assert rc == 0, cap.err
    warns = [ln for ln in cap.err.splitlines() if ln.startswith("warning:")]
    assert len(warns) == 1 and "'densty'" in warns[0] and "did you mean 'density'?" in warns[0]
    a, b = tensors(dirs["m1"]), tensors(dirs["m2"])
    got = tensors(out)
    for n in a:  # weights 1 and 1, normalized: the mean
        np.testing.assert_allclose(got[n], (a[n] + b[n]) / 2, rtol=1e-6, atol=1e-7)


# ---- YAML text --------------------------------------------------------------------------------

def test_number_yaml_reads_as_text_is_named(tmp_path):
    cfg = tmp_path / "c.yml"
    cfg.write_text("merge_method: linear\nmodels:\n  - {model: a, parameters: {weight: 1e308}}\n")
    assert yaml.safe_load(cfg.read_text())["models"][0]["parameters"]["weight"] == "1e308"  # PyYAML's view
    with pytest.raises(JmergeError) as e:
        load_plan(cfg)
    msg = str(e.value)
    assert "'weight' is the string '1e308' (YAML reads 1e308 as text; write 1.0e+308)" in msg
    fixed = tmp_path / "d.yml"
    fixed.write_text(cfg.read_text().replace("1e308", "1.0e+308"))
    assert load_plan(fixed).slices[0].sources[0].params["weight"] == 1e308


def test_non_utf8_config_one_line(capsys, tmp_path):
    cfg = tmp_path / "c.yml"
    raw = b"merge_method: linear\nmodels: [{model: caf\xe9}]\n"
    cfg.write_bytes(raw)
    rc, cap = cli(capsys, "merge", cfg, tmp_path / "out", "-q")
    one_line_error(rc, cap, f"not UTF-8 text (byte 0xe9 at offset {raw.index(0xe9)})", tmp_path / "out")


# ---- all-zero weights ------------------------------------------------------------------------

@pytest.mark.parametrize("text, needle", [
    ("merge_method: linear\nmodels: [{{model: {m1}, parameters: {{weight: 0}}}}, {{model: {m2}, parameters: {{weight: 0}}}}]\n",
     "are all 0 for model.embed_tokens.weight (and 29 more tensors)"),
    # a gradient that reaches 0 in both models at the last layer only: that layer is named
    ("merge_method: linear\nmodels: [{{model: {m1}, parameters: {{weight: [1, 0]}}}}, "
     "{{model: {m2}, parameters: {{weight: [1, 1, 0]}}}}]\n", "for model.layers.2."),
    ("merge_method: linear\nmodels: [{{model: {m1}, parameters: {{weight: 1}}}}, {{model: {m2}, parameters: {{weight: -1}}}}]\n",
     "sum to 0"),
    ("merge_method: ties\nbase_model: {m0}\nmodels: [{{model: {m1}, parameters: {{weight: 0}}}}, {{model: {m2}, parameters: {{weight: 0}}}}]\n",
     "are all 0"),
])
def test_zero_weights_refused(capsys, tmp_path, dirs, text, needle):
    cfg = tmp_path / "c.yml"
    cfg.write_text(text.format(**dirs))
    out = tmp_path / "out"
    rc, cap = cli(capsys, "merge", cfg, out, "-q")
    one_line_error(rc, cap, needle, out)
    assert "divides by their sum" in cap.err


def test_zero_weights_without_normalize_merge(tmp_path, dirs):
    from jmerge.engine import merge
    cfg = tmp_path / "c.yml"
    cfg.write_text(f"merge_method: linear\nmodels: [{{model: {dirs['m1']}, parameters: {{weight: 0}}}}, "
                   f"{{model: {dirs['m2']}, parameters: {{weight: 0}}}}]\nparameters: {{normalize: false}}\n")
    merge(cfg, tmp_path / "out", mode="stream")
    assert all(not x.any() for x in tensors(tmp_path / "out").values())


# ---- non-finite outputs ----------------------------------------------------------------------

# Finite inputs whose merge overflows float32 in the post-attention norms only (weights ~1).
OVERFLOW = """merge_method: linear
models:
  - {{model: {m1}, parameters: {{weight: [{{filter: post_attention_layernorm, value: 3.0e+38}}, {{value: 0.5}}]}}}}
  - {{model: {m2}, parameters: {{weight: [{{filter: post_attention_layernorm, value: 3.0e+38}}, {{value: 0.5}}]}}}}
parameters: {{normalize: false}}
"""


@pytest.mark.parametrize("mode", ["--stream", "--in-memory"])
def test_nonfinite_output_refused_then_allowed(capsys, tmp_path, dirs, mode):
    cfg = tmp_path / "c.yml"
    cfg.write_text(OVERFLOW.format(**dirs))
    a, b = tensors(dirs["m1"]), tensors(dirs["m2"])
    with np.errstate(over="ignore"):
        want = {n: np.float32(3e38) * a[n] + np.float32(3e38) * b[n] if "post_attention_layernorm" in n
                else np.float32(0.5) * a[n] + np.float32(0.5) * b[n] for n in a}
    overflowed = [n for n in want if not np.isfinite(want[n]).all()]
    assert sorted(overflowed) == [f"model.layers.{i}.post_attention_layernorm.weight" for i in range(3)]

    out = tmp_path / "out"
    rc, cap = cli(capsys, "merge", cfg, out, "-q", mode)
    one_line_error(rc, cap, "the merged model.layers.0.post_attention_layernorm.weight", out)
    assert "has NaN/Inf values" in cap.err and "--allow-nonfinite" in cap.err
    if mode == "--in-memory":  # all of them seen at once; streaming stops at the first
        assert "(and 2 more)" in cap.err

    rc, cap = cli(capsys, "merge", cfg, out, "-q", mode, "--allow-nonfinite")
    assert rc == 0, cap.err
    warns = [ln for ln in cap.err.splitlines() if ln.startswith("warning:")]
    assert len(warns) == 1 and "model.layers.0.post_attention_layernorm.weight (and 2 more)" in warns[0]
    got = tensors(out)
    for n in want:
        np.testing.assert_allclose(got[n], want[n], rtol=1e-6, atol=1e-7)


# ---- inspect ---------------------------------------------------------------------------------

def test_inspect_nan_model_strict_json(capsys, tmp_path, dirs):
    bad = copy_with_nan(dirs["m1"], tmp_path / "bad")
    out = tmp_path / "report"
    rc, cap = cli(capsys, "inspect", "--base", dirs["m0"], "--models", bad, dirs["m2"], "--out", out)
    assert rc == 0, cap.err
    warns = [ln for ln in cap.err.splitlines() if ln.startswith("warning:")]
    assert len(warns) == 1 and f"{bad}: model.layers.1.mlp.up_proj.weight" in warns[0]

    def refuse(name):
        raise ValueError(f"{name} in report.json")

    r = json.loads((out / "report.json").read_text(), parse_constant=refuse)
    assert r["norm"][str(bad)] is None and r["norm"][str(dirs["m2"])] > 0
    assert r["norm_per_row"][str(bad)][r["rows"].index("1")] is None
    assert r["norm_per_row"][str(bad)][r["rows"].index("0")] > 0  # other layers keep their numbers
    assert r["nonfinite"] == [f"{bad}: model.layers.1.mlp.up_proj.weight"]


# ---- mergekit keys, against mergekit ----------------------------------------------------------

def both(tmp_path, text, name):
    """(mergekit's output, jmerge's output, jmerge's warnings) of one config."""
    from mergekit_ref import run_mergekit
    from jmerge.engine import merge
    cfg = tmp_path / f"{name}.yml"
    cfg.write_text(text)
    mk = run_mergekit(cfg, tmp_path / f"{name}-mergekit")
    r = merge(cfg, tmp_path / f"{name}-jmerge", mode="stream")
    return tensors(mk), tensors(r.out), r.warnings


def assert_same(mk, jm):
    assert sorted(mk) == sorted(jm)
    for n in mk:
        assert mk[n].shape == jm[n].shape, n
        np.testing.assert_allclose(jm[n], mk[n], rtol=1e-6, atol=1e-6, err_msg=n)


def test_modules_default_as_mergekit(tmp_path, dirs):
    """`modules: {default: ...}`: the one module of a Llama; its parameters rank between the
    slice's and the top level's (m2 takes the module's weight, m1 its own, density the module's)."""
    text = f"""merge_method: ties
base_model: {dirs['m0']}
modules:
  default:
    slices:
      - sources:
          - {{model: {dirs['m0']}, layer_range: [0, 2]}}
          - {{model: {dirs['m1']}, layer_range: [1, 3], parameters: {{weight: 0.7}}}}
          - {{model: {dirs['m2']}, layer_range: [1, 3]}}
      - sources:
          - {{model: {dirs['m0']}, layer_range: [2, 3]}}
          - {{model: {dirs['m1']}, layer_range: [0, 1]}}
          - {{model: {dirs['m2']}, layer_range: [0, 1]}}
    parameters: {{weight: 0.3, density: 0.6}}
parameters: {{weight: 0.9, density: 0.2, normalize: false}}
"""
    mk, jm, warnings = both(tmp_path, text, "modules")
    assert_same(mk, jm)
    assert warnings == []
    _, jobs = jobs_of(text, {str(d): 3 for d in dirs.values()})
    j = jobs["model.layers.0.mlp.up_proj.weight"]
    assert j.params["weight"] == (0.7, 0.3) and j.params["density"] == (0.6, 0.6)
    assert j.params["normalize"] is False


def test_residual_weight_and_ignored_params_as_mergekit(tmp_path, dirs):
    """mergekit 0.1.5 reads residual_weight and never uses it, and ignores `density` on linear."""
    text = f"""merge_method: linear
slices:
  - sources:
      - {{model: {dirs['m1']}, layer_range: [0, 3], parameters: {{weight: 0.25, density: 0.5}}}}
      - {{model: {dirs['m2']}, layer_range: [0, 3], parameters: {{weight: [1, 0.5]}}}}
    residual_weight: 0.5
"""
    mk, jm, warnings = both(tmp_path, text, "residual")
    assert_same(mk, jm)
    assert len(warnings) == 2
    assert "'density'" in warnings[0] and "linear" in warnings[0]
    assert "residual_weight" in warnings[1] and "slices[0]" in warnings[1]


def test_tokenizer_tokens_as_mergekit(tmp_path, dirs):
    """tokenizer.tokens: a model's row where a model lacks the token, another model's row by id
    or by token for every model (force), zeros for a new token; padded rows as mergekit pads."""
    from test_merging import with_tokenizer
    from transformers import AutoTokenizer
    plain = {f"t{i}": i for i in range(97)}
    odd = dict(plain)
    del odd["t5"]
    odd["xnew"] = 5  # k1 lacks t5 and has a token nobody else has
    b = with_tokenizer(dirs["m0"], tmp_path / "b", plain)
    k1 = with_tokenizer(dirs["m1"], tmp_path / "k1", odd)
    k2 = with_tokenizer(dirs["m2"], tmp_path / "k2", plain)
    # mergekit 0.1.5 crashes adding a token to `source: base` (it edits the base's own vocabulary),
    # so the new token goes into a union
    text = f"""merge_method: linear
models:
  - {{model: {b}, parameters: {{weight: 0.2}}}}
  - {{model: {k1}, parameters: {{weight: 0.3}}}}
  - {{model: {k2}, parameters: {{weight: 0.5}}}}
base_model: {b}
tokenizer:
  source: union
  pad_to_multiple_of: 8
  tokens:
    t5: {{source: {k2}}}
    t9: {{source: {{kind: model_token, model: {k1}, token_id: 3}}, force: true}}
    brandnew: {{source: {{kind: zero}}}}
    t11: {{source: {b}, force: true}}
    xnew: {{source: {{kind: model_token, model: {k1}, token: t40}}}}
"""
    mk, jm, _ = both(tmp_path, text, "tokens")
    assert_same(mk, jm)
    tok = AutoTokenizer.from_pretrained(tmp_path / "tokens-jmerge")
    assert tok.convert_tokens_to_ids(["xnew", "brandnew"]) == [97, 98]
    # a few rows by hand, so that agreeing with mergekit means what it says
    B, K1, K2 = tensors(b), tensors(k1), tensors(k2)
    e = jm["model.embed_tokens.weight"]
    assert e.shape == (104, 32)
    w = (0.2, 0.3, 0.5)
    np.testing.assert_allclose(e[5], w[0] * B["model.embed_tokens.weight"][5] + w[1] * K2["model.embed_tokens.weight"][5]
                               + w[2] * K2["model.embed_tokens.weight"][5], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(e[9], K1["model.embed_tokens.weight"][3], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(e[11], B["model.embed_tokens.weight"][11], rtol=1e-5, atol=1e-6)
    # xnew: k1 keeps its own row (5); b and k2 lack the token and take k1's row of t40
    np.testing.assert_allclose(e[97], (w[0] + w[2]) * K1["model.embed_tokens.weight"][40]
                               + w[1] * K1["model.embed_tokens.weight"][5], rtol=1e-5, atol=1e-6)
    assert not e[98].any()
    np.testing.assert_allclose(e[99:], np.broadcast_to(e[:99].mean(0), (5, 32)), rtol=1e-5, atol=1e-6)
