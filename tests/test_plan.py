"""mergekit YAML -> plan: parameter evaluation (hand-computed), precedence, validation errors."""

import pytest
import yaml

from jmerge.errors import JmergeError
from jmerge.engine import load_plan, parse_plan, resolve
from jmerge.engine.settings import evaluate

LAYER = ["self_attn.q_proj.weight", "mlp.up_proj.weight"]
PRE, POST = ["model.embed_tokens.weight"], ["model.norm.weight", "lm_head.weight"]


def plan_of(text: str):
    return parse_plan(yaml.safe_load(text), "cfg.yml")


def jobs_of(plan, layers):
    res = resolve(plan, layers, LAYER, PRE, POST)
    return res, {j.out_name: j for j in res.jobs}


# ---- evaluation ------------------------------------------------------------------------------

def test_gradient_is_linear_between_anchors():
    g = [0.0, 1.0, 0.5]
    # t * (len - 1) = position among the anchors, linear in between
    assert evaluate(g, "x", 0.0) == 0.0
    assert evaluate(g, "x", 0.25) == pytest.approx(0.5)
    assert evaluate(g, "x", 0.5) == pytest.approx(1.0)
    assert evaluate(g, "x", 0.75) == pytest.approx(0.75)
    assert evaluate(g, "x", 1.0) == pytest.approx(0.5)


def test_filters_first_substring_wins_and_fallback():
    s = [{"filter": "mlp", "value": 0.1}, {"filter": "self_attn", "value": [0, 1]}, {"value": 0.9}]
    assert evaluate(s, "model.layers.3.mlp.up_proj.weight", 0.3) == 0.1
    assert evaluate(s, "model.layers.3.self_attn.q_proj.weight", 0.5) == pytest.approx(0.5)
    assert evaluate(s, "model.norm.weight", 0.5) == 0.9
    assert evaluate([{"filter": "mlp", "value": 1}], "lm_head.weight", 0) is None


def test_resolve_precedence_and_t():
    plan = plan_of("""
merge_method: ties
base_model: b
models:
  - model: a
    parameters:
      weight: [{filter: mlp, value: 2.0}]   # no match for attention: falls to top level
      density: [1.0, 0.5]
  - model: c
parameters: {weight: 0.25, density: 0.8, lambda: [1.0, 3.0]}
""")
    res, jobs = jobs_of(plan, {"a": 3, "b": 3, "c": 3})
    assert res.num_layers == 3
    # layers i = 0, 1, 2 -> t = 0, 0.5, 1
    up = [jobs[f"model.layers.{i}.mlp.up_proj.weight"] for i in range(3)]
    q = [jobs[f"model.layers.{i}.self_attn.q_proj.weight"] for i in range(3)]
    assert [j.models for j in up] == [("a", "c")] * 3
    assert [j.base for j in up] == ["b"] * 3
    assert [j.params["weight"] for j in up] == [(2.0, 0.25)] * 3
    assert [j.params["weight"] for j in q] == [(0.25, 0.25)] * 3
    assert [j.params["density"][0] for j in up] == pytest.approx([1.0, 0.75, 0.5])
    assert [j.params["density"][1] for j in up] == [0.8] * 3
    assert [j.params["lambda"] for j in up] == pytest.approx([1.0, 2.0, 3.0])
    # embeddings, final norm and head all at t = 0 (mergekit 0.1.5)
    assert jobs["model.embed_tokens.weight"].params["lambda"] == 1.0
    assert jobs["lm_head.weight"].params["lambda"] == 1.0
    assert jobs["model.norm.weight"].params["density"] == (1.0, 0.8)


def test_slices_restart_t_and_stack_layers():
    plan = plan_of("""
merge_method: passthrough
slices:
  - sources: [{model: x, layer_range: [0, 3], parameters: {scale: [0, 1]}}]
  - sources: [{model: y, layer_range: [1, 2]}]
  - sources: [{model: x, layer_range: [1, 3]}]
parameters: {scale: 7}
""")
    res, jobs = jobs_of(plan, {"x": 3, "y": 2})
    assert res.num_layers == 6 and res.slice_layers == [(0, 3), (3, 4), (4, 6)]
    assert [jobs[f"model.layers.{i}.mlp.up_proj.weight"].params["scale"][0] for i in range(6)] == \
        pytest.approx([0, 0.5, 1, 7, 7, 7])
    j = jobs["model.layers.3.mlp.up_proj.weight"]
    assert j.models == ("y",) and j.in_names == ("model.layers.1.mlp.up_proj.weight",)
    assert jobs["model.layers.5.self_attn.q_proj.weight"].in_names == ("model.layers.2.self_attn.q_proj.weight",)
    assert jobs["model.embed_tokens.weight"].models == ("x",)  # first slice's sources
    assert jobs["lm_head.weight"].models == ("x",)  # last slice's


def test_base_is_appended_and_linear_counts_it():
    plan = plan_of("merge_method: linear\nbase_model: b\nmodels:\n  - {model: a, parameters: {weight: 1}}\n"
                   "parameters: {weight: 3}\n")
    _, jobs = jobs_of(plan, {"a": 2, "b": 2})
    j = jobs["model.layers.0.mlp.up_proj.weight"]
    assert j.base is None and j.models == ("a", "b") and j.params["weight"] == (1, 3)


# ---- errors --------------------------------------------------------------------------------

@pytest.mark.parametrize("text, needle", [
    ("merge_methd: ties\nmodels: [{model: a}]\n", "did you mean 'merge_method'"),
    ("merge_method: tie\nbase_model: b\nmodels: [{model: a}]\n", "did you mean 'ties'"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: a, parameters: {denisty: 0.5, weight: 1}}]\n",
     "did you mean 'density'"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: a, paramters: {}}]\n", "did you mean 'parameters'"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: a, parameters: {density: 1.5, weight: 1}}]\n",
     "density must be in (0, 1]"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: a, parameters: {density: [0, 1], weight: 1}}]\n",
     "density must be in (0, 1]"),
    ("merge_method: ties\nmodels: [{model: a, parameters: {weight: 1}}]\n", "needs a base_model"),
    ("merge_method: slerp\nbase_model: a\nmodels: [{model: a}, {model: b}, {model: c}]\nparameters: {t: 0.5}\n",
     "exactly two models"),
    ("merge_method: slerp\nbase_model: a\nmodels: [{model: a}, {model: b}]\n", "needs parameter 't'"),
    ("merge_method: ties\nbase_model: a\nmodels: [{model: b}]\nslices: [{sources: [{model: a, layer_range: [0, 1]}]}]\n",
     "exactly one of"),
    ("merge_method: ties\nbase_model: hf://org/m\nmodels: [{model: b}]\n", "only local paths"),
    ("merge_method: nuslerp\nmodels: [{model: a, parameters: {weight: 1}}, {model: b, parameters: {weight: 1}}]\n"
     "parameters: {nuslerp_flatten: [0, 1]}\n", "one scalar"),
])
def test_bad_config(text, needle):
    with pytest.raises(JmergeError, match=None) as e:
        plan_of(text)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_problems_listed_together():
    with pytest.raises(JmergeError) as e:
        plan_of("merge_method: ties\nbase_model: b\nbogus: 1\n"
                "models: [{model: a, parameters: {density: 2, weight: 1, wieght: 1}}]\n")
    msg = str(e.value)
    assert "bogus" in msg and "density must be" in msg and "wieght" in msg


def test_yaml_syntax_error_has_line(tmp_path):
    f = tmp_path / "c.yml"
    f.write_text("merge_method: ties\nmodels:\n  - model: a\n   parameters: {weight: 1}\n")
    with pytest.raises(JmergeError, match=r"YAML syntax error at line 4"):
        load_plan(f)


def test_layer_range_out_of_bounds():
    plan = plan_of("merge_method: passthrough\nslices:\n  - sources: [{model: x, layer_range: [2, 5]}]\n")
    with pytest.raises(JmergeError, match=r"layer_range \[2, 5\] is out of bounds: x has 3 layers"):
        resolve(plan, {"x": 3}, LAYER, PRE, POST)


def test_missing_required_weight():
    plan = plan_of("merge_method: task_arithmetic\nbase_model: b\nmodels: [{model: a}]\n")
    with pytest.raises(JmergeError, match="'weight' is required for a"):
        resolve(plan, {"a": 2, "b": 2}, LAYER, PRE, POST)
