"""configs/smoke.yaml is the main job in miniature (CI runs it through `scripts/demo.sh --smoke`):
it must keep exercising every part of configs/demo.yaml, or CI stops covering what it drops."""

from pathlib import Path

import yaml

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _load(name):
    return yaml.safe_load((CONFIGS / name).read_text())


def test_smoke_runs_every_search_baseline_and_suite_of_the_demo():
    demo, smoke = _load("demo.yaml"), _load("smoke.yaml")
    assert set(smoke["searches"]) == set(demo["searches"])
    for name, settings in demo["searches"].items():
        # Same knobs (method, granularity, export, ...), only the budgets shrink.
        assert set(smoke["searches"][name]) == set(settings), name
        for key in ("method", "granularity", "transform", "export", "safe", "params"):
            assert smoke["searches"][name].get(key) == settings.get(key), (name, key)
    assert smoke["baselines"] == demo["baselines"]
    assert smoke["eval"]["suites"] == demo["eval"]["suites"]
    assert set(smoke["data"]) == set(demo["data"]) and set(smoke["experts"]) == set(demo["experts"])


def test_smoke_reads_the_smoke_testbed_never_the_real_one():
    text = (CONFIGS / "smoke.yaml").read_text()
    assert "testbed/current" not in text and "testbed/smoke" in text
    assert _load("smoke.yaml")["out"] != _load("demo.yaml")["out"]


def test_smoke_budgets_are_a_step_or_two():
    s = _load("smoke.yaml")["searches"]
    assert s["coefficients"]["steps"] <= 2 and s["masks"]["steps"] <= 2
    assert s["evolve"]["generations"] * s["evolve"]["popsize"] <= 4
