"""`--dry-run`: per-device memory of the compiled programs, from config.json alone.

The CLI tests run tiny models; the budget tests hold issue 16's budgets (bf16 weights, K = 2 task
vectors, search batch 8 x 2048, generation 64 x (2048 + 256), Llama-3 8B / 70B configs) on
simulated CPU devices, each one launch of the command with --json.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

GIB = 1 << 30
SHAPES = ROOT / "configs" / "shapes"


def launch(args: list[str], cwd: Path, devices: int | None = None, timeout: float = 900):
    """`python -m jmerge ARGS` in a fresh process with `devices` simulated CPU devices (None: one,
    so a --devices above it makes the command re-execute itself)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JMERGE_")}
    env.update(JAX_PLATFORMS="cpu", JMERGE_NO_COMPILE_CACHE="1",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices or 1}")
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "jmerge", *args], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=timeout)
    r.seconds = time.perf_counter() - t0
    return r


def config_only(src: Path, dst: Path, bait: bool = True) -> Path:
    """A model dir holding src's config.json; `bait`: and a corrupt weight file, which any read
    of the weights would trip on."""
    dst.mkdir(parents=True)
    shutil.copy2(src / "config.json", dst / "config.json")
    if bait:
        (dst / "model.safetensors").write_bytes(b"not a safetensors file")
    return dst


def error_lines(r) -> list[str]:
    return [line for line in r.stderr.splitlines() if line.startswith("jmerge:")]


# ------------------------------------------------------------------------------------- CLI

@pytest.fixture(scope="module")
def tiny(tiny_model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("dry")
    for name, seed in (("base", 0), ("e1", 1), ("e2", 2)):
        config_only(tiny_model_dir("llama", seed), d / name)
    (d / "d.jsonl").write_text(json.dumps({"prompt": "hi", "response": "hello"}) + "\n")
    cfg = dict(base="base", experts={"e1": "e1", "e2": "e2"}, data={"safety": {"path": "d.jsonl"}},
               searches={"coefficients": {"batch_size": 2}},
               baselines=[], eval={"suites": ["safety"], "batch_size": 2, "max_new_tokens": 4},
               max_len=32, out="out")
    (d / "search.yaml").write_text(yaml.safe_dump(cfg))
    return d


def test_generate_json_simulated_devices_and_no_weight_read(tiny):
    """--devices 2 in a 1-device process re-executes on 2 CPU devices; the model dir's weight file
    is garbage, so any weight read would fail."""
    r = launch(["generate", "--model", "base", "--prompts", "none.txt", "--dry-run", "--devices", "2",
                "--prompt-tokens", "20", "--batch-size", "4", "--max-new-tokens", "8", "--json"], tiny)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["devices"] == 2 and out["simulated"] and out["fits"] and out["mesh"]["fsdp"] == 2
    progs = {p["name"]: p for p in out["programs"]}
    assert set(progs) == {"cache_init", "generate"}
    g = progs["generate"]
    assert g["peak"] == g["arguments"] + g["temporaries"] + g["outputs"] - g["aliased"] > 0
    # the tiny model's float32 params (~30k), fsdp-sharded where the rules split them
    assert 4 * 10_000 < g["shares"]["model"] < 4 * 30_000 and g["by_argument"]["params"] == g["shares"]["model"]
    assert "running again on 2 simulated CPU devices" in r.stderr


def test_generate_counts_prompt_tokens(tiny_tok_dir, tmp_path):
    """With a tokenizer at hand the prompts' own longest length (chat template included) sizes
    the programs."""
    (tmp_path / "p.txt").write_text("hi\n" + "x" * 40 + "\nyo\n")
    r = launch(["generate", "--model", str(tiny_tok_dir["chat"]), "--prompts", "p.txt", "--dry-run", "--json",
                "--batch-size", "2", "--max-new-tokens", "4"], tmp_path)
    assert r.returncode == 0, r.stderr
    note = json.loads(r.stdout)["notes"][0]
    tokens = int(note.split("(")[1].split()[0])
    assert note.startswith("batch 2 x (") and 40 < tokens < 80, note


def test_eval_programs_once_per_shape(tiny):
    r = launch(["eval", "--models", "base", "e1", "--suite", "safety,domain", "--dry-run", "--json",
                "--prompt-tokens", "40", "--batch-size", "4", "--max-new-tokens", "4"], tiny, devices=2)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert [p["name"] for p in out["programs"]] == ["base:cache_init", "base:generate", "base:score"]
    assert "e1: same programs as base" in out["notes"]


def test_search_table_and_too_small_memory(tiny):
    r = launch(["search", "--config", "search.yaml", "--dry-run", "--device-memory", "1KiB"], tiny, devices=2)
    assert r.returncode == 2, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("jmerge search --dry-run: simulated on 2 CPU devices")
    names = ("coefficients:step", "coefficients:export:layers", "eval:generate")
    assert all(any(line.startswith(n) and "over by" in line for line in lines) for n in names), r.stdout
    errors = error_lines(r)
    rows = [line for line in lines if "over by" in line]
    assert len(errors) == len(rows) >= 3 and all(e.startswith("jmerge: error: search program ") for e in errors)
    assert all("more than the 1.00 KiB of a device" in e for e in errors)
    assert "; tensor base['model']" in errors[0] and " alone is " in errors[0]  # no tensor fits in 1 KiB


def test_search_exports_from_parked_models(tiny):
    """The export programs take the models from host memory: their bytes are host arguments, not
    in the device's peak, which holds the merged layers and one group of each model's."""
    r = launch(["search", "--config", "search.yaml", "--dry-run", "--json"], tiny, devices=2)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    p = {x["name"]: x for x in out["programs"]}
    step, layers = p["coefficients:step"], p["coefficients:export:layers"]
    models = step["by_argument"]["base"] + step["by_argument"]["tvs"]
    assert layers["by_argument"]["base_layers"] == layers["by_argument"]["expert_layers"] == 0
    assert 0.5 * models < layers["host_arguments"] < models and layers["peak"] < models, (layers, models)
    assert out["parked_host_bytes"] == models and any("parked in host memory" in n for n in out["notes"])


def test_merge_mode_and_programs(tiny, tiny_model_dir):
    """A TIES merge of config-only models: `auto` picks by --device-memory (the tiny merge fits in
    memory) and the in-memory programs are analysed. (The merge reads safetensors headers where
    there are any, so these dirs hold no bait.)"""
    for seed in range(3):
        config_only(tiny_model_dir("llama", seed), tiny / f"merge{seed}", bait=False)
    cfg = dict(merge_method="ties", base_model="merge0", dtype="float32",
               models=[{"model": m, "parameters": {"weight": 1.0, "density": 0.5}} for m in ("merge1", "merge2")])
    (tiny / "ties.yaml").write_text(yaml.safe_dump(cfg))
    r = launch(["merge", "ties.yaml", "out", "--dry-run", "--json", "--device-memory", "80GB"], tiny, devices=2)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["mode"] == "memory" and out["fits"] and out["device_memory"] == 80 * 10**9
    assert any(p["name"].startswith("lm_head.weight") for p in out["programs"]) and not (tiny / "out").exists()


def test_bad_input_one_line(tiny, tmp_path):
    cases = [  # (args, devices, words of the one line)
        (["generate", "--model", "base", "--prompts", "x", "--dry-run", "--device-memory", "80XB"], 1, "--device-memory"),
        (["generate", "--model", "base", "--prompts", "x", "--dry-run", "--mesh", "tensor=3",
          "--prompt-tokens", "8"], 4, "--mesh"),
        (["generate", "--model", "base", "--prompts", "x", "--devices", "2"], 1, "--dry-run only"),
        (["generate", "--model", "base", "--prompts", "x", "--dry-run"], 1, "--prompt-tokens"),
    ]
    for args, devices, words in cases:
        r = launch(args, tiny, devices)
        assert r.returncode == 2 and len(error_lines(r)) == 1 and words in r.stderr, (args, r.stderr)


# --------------------------------------------------------------------------------- budgets

def models(d: Path, shape: str, names) -> dict:
    return {n: str(config_only(SHAPES / shape, d / n, bait=False)) for n in names}


def search_yaml(d: Path, shape: str, search: dict, experts: int) -> Path:
    m = models(d, shape, ["base"] + [f"e{i}" for i in range(experts)])
    (d / "d.jsonl").write_text(json.dumps({"prompt": "hi", "response": "hello"}) + "\n")
    cfg = dict(base=m["base"], experts={n: p for n, p in m.items() if n != "base"},
               data={"safety": {"path": str(d / "d.jsonl")}}, searches=search, baselines=[],
               eval={"suites": ["safety"]}, max_len=2048, dtype="bfloat16", out=str(d / "out"))
    (d / "c.yaml").write_text(yaml.safe_dump(cfg))
    return d / "c.yaml"


def check_budget(r, budget_gib: float, what: str):
    assert r.returncode in (0, 2) and r.stdout.strip(), r.stderr
    out = json.loads(r.stdout)
    peaks = {p["name"]: round(p["peak"] / GIB, 2) for p in out["programs"]}
    print(f"{what}: {peaks} GiB per device, {r.seconds:.0f} s")
    assert max(peaks.values()) <= budget_gib, f"{what}: {peaks} GiB per device over {budget_gib} GiB"
    return out


SEARCHES = [  # (what, shape, devices, search, experts, budget GiB)
    ("coefficients 8B on 1", "llama-3-8b", 1, {"coefficients": {"granularity": "layer_module", "batch_size": 8}}, 2, 64),
    ("coefficients 70B on 8", "llama-3-70b", 8, {"coefficients": {"granularity": "layer_module", "batch_size": 8}}, 2, 64),
    ("row masks 70B on 32", "llama-3-70b", 32, {"masks": {"granularity": "row", "batch_size": 8, "safe": "e0"}}, 3, 64),
    ("element masks 70B on 64", "llama-3-70b", 64, {"masks": {"granularity": "element", "batch_size": 8, "safe": "e0"}}, 3, 80),
]


@pytest.mark.parametrize("what,shape,devices,search,experts,budget", SEARCHES,
                         ids=[getattr(s, "values", s)[0] for s in SEARCHES])
def test_search_budget(tmp_path, what, shape, devices, search, experts, budget):
    c = search_yaml(tmp_path, shape, search, experts)
    r = launch(["search", "--config", str(c), "--dry-run", "--json", "--device-memory", f"{budget}GiB"],
               tmp_path, devices)
    check_budget(r, budget, f"search {what}")


GENERATION = [("8B on 1", "llama-3-8b", 1, 48), ("70B on 8", "llama-3-70b", 8, 64)]


@pytest.mark.parametrize("what,shape,devices,budget", GENERATION, ids=[g[0] for g in GENERATION])
def test_generation_budget(tmp_path, what, shape, devices, budget):
    m = models(tmp_path, shape, ["m"])["m"]
    r = launch(["generate", "--model", m, "--prompts", "p.txt", "--dry-run", "--json", "--dtype", "bfloat16",
                "--batch-size", "64", "--prompt-tokens", "2048", "--max-new-tokens", "256",
                "--device-memory", f"{budget}GiB"], tmp_path, devices)
    check_budget(r, budget, f"generation {what}")


def test_ties_merge_budget(tmp_path):
    """3 x 70B TIES in memory on 8 devices within 64 GiB each, else `auto` streams."""
    m = models(tmp_path, "llama-3-70b", ["base", "a", "b"])
    cfg = dict(merge_method="ties", base_model=m["base"], dtype="bfloat16",
               models=[{"model": m[n], "parameters": {"weight": 1.0, "density": 0.5}} for n in ("a", "b")])
    (tmp_path / "ties.yaml").write_text(yaml.safe_dump(cfg))
    r = launch(["merge", "ties.yaml", "out", "--dry-run", "--json", "--mesh", "fsdp=8", "--device-memory", "64GiB"],
               tmp_path, 8)
    out = check_budget(r, 64, f"TIES merge 3 x 70B ({json.loads(r.stdout).get('mode')})")
    assert out["mode"] in ("memory", "stream")
    if out["mode"] == "memory":  # the programs plus the merged tensors already placed
        assert out["memory_need"] <= 64 * GIB, out["memory_need"] / GIB
