"""The merge engine end to end on tiny Llama models: both modes bit-identical (and across mesh
shapes and runs), numbers against numpy transcriptions of the formulas, slices, tokenizers,
transformers loading, and bad input -> one line, exit 2, nothing written."""

import errno
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import copy_with_nan

from jmerge import sharding as shd
from jmerge.cli import run
from jmerge.io.safetensors_io import Checkpoint
from jmerge.engine import merge

CONFIGS = {
    "task_arithmetic": """
models:
  - model: {m1}
    parameters: {{weight: [1, 0.2]}}
  - model: {m2}
    parameters: {{weight: [{{filter: mlp, value: 0.3}}, {{value: 0.5}}]}}
merge_method: task_arithmetic
base_model: {m0}
parameters: {{lambda: 0.9}}
""",
    "linear": """
models:
  - {{model: {m1}, parameters: {{weight: [0.2, 1]}}}}
  - {{model: {m2}, parameters: {{weight: 0.5}}}}
merge_method: linear
""",
    "ties": """
models:
  - model: {m1}
    parameters: {{density: [1, 0.5], weight: 0.6}}
  - model: {m2}
    parameters: {{density: 0.5, weight: [{{filter: mlp, value: 0.3}}, {{value: 0.5}}]}}
merge_method: ties
base_model: {m0}
parameters: {{normalize: true}}
""",
    "dare_ties": """
models:
  - model: {m1}
    parameters: {{density: 0.5, weight: 0.5}}
  - model: {m2}
    parameters: {{density: [0.3, 0.9], weight: 0.7}}
merge_method: dare_ties
base_model: {m0}
""",
    "della": """
models:
  - {{model: {m1}, parameters: {{density: 0.5, weight: 0.5}}}}
  - {{model: {m2}, parameters: {{density: 0.6, weight: 0.5}}}}
merge_method: della
base_model: {m0}
parameters: {{epsilon: 0.1}}
""",
    "slerp": """
models: [{{model: {m0}}}, {{model: {m1}}}]
merge_method: slerp
base_model: {m0}
parameters:
  t: [{{filter: self_attn, value: [0, 0.5, 1]}}, {{value: 0.3}}]
""",
    # Slices whose sources start at different layers: the in-memory layer calls must index each
    # input at its own offset (2 + 1 output layers).
    "ties_slices": """
slices:
  - sources:
      - {{model: {m0}, layer_range: [0, 2]}}
      - {{model: {m1}, layer_range: [1, 3], parameters: {{weight: 1.0, density: 0.6}}}}
      - {{model: {m2}, layer_range: [1, 3], parameters: {{weight: 0.5, density: 0.6}}}}
  - sources:
      - {{model: {m0}, layer_range: [2, 3]}}
      - {{model: {m1}, layer_range: [0, 1], parameters: {{weight: 1.0, density: 0.6}}}}
      - {{model: {m2}, layer_range: [0, 1], parameters: {{weight: 0.5, density: 0.6}}}}
merge_method: ties
base_model: {m0}
""",
}


pytestmark = pytest.mark.usefixtures("no_persistent_compile_cache")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("merging")


def write_cfg(work, name, text, dirs):
    f = work / f"{name}.yml"
    f.write_text(text.format(**{k: str(v) for k, v in dirs.items()}))
    return f


def tensors(d):
    ck = Checkpoint(d)
    return {n: np.array(ck.array(n)) for n in ck.names()}


_OUT = {}


def merged(work, dirs, method, mode, mesh=None, seed=0):
    key = (method, mode, mesh, seed)
    if key not in _OUT:
        cfg = write_cfg(work, method, CONFIGS[method], dirs)
        out = work / f"out-{method}-{mode}-{mesh}-{seed}"
        m = None if mesh is None else shd.make_mesh({"data": 1, "fsdp": mesh, "tensor": 1},
                                                    devices=jax.devices()[:mesh])
        merge(cfg, out, mode=mode, seed=seed, mesh=m)
        _OUT[key] = tensors(out)
    return _OUT[key]


def same(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", ["ties", "dare_ties", "della", "slerp", "task_arithmetic", "linear", "ties_slices"])
def test_stream_and_memory_bit_identical(work, dirs, method):
    assert same(merged(work, dirs, method, "stream"), merged(work, dirs, method, "memory"))


def test_sliced_layers_on_a_mesh_that_splits_them(work, dirs):
    ref = merged(work, dirs, "ties_slices", "stream")
    assert same(ref, merged(work, dirs, "ties_slices", "memory", mesh=2))  # 2-layer slice split
    names = [n for n in ref if ".layers." in n and n.endswith("up_proj.weight")]
    assert len(names) == 3


@pytest.mark.parametrize("method", ["dare_ties"])
def test_random_methods_same_bits_on_any_mesh_and_run(work, dirs, method):
    ref = merged(work, dirs, method, "stream")
    assert same(ref, merged(work, dirs, method, "memory", mesh=3))  # one layer per device
    assert same(ref, merged(work, dirs, method, "memory", mesh=8))  # 3 layers: not divisible
    assert not same(ref, merged(work, dirs, method, "stream", seed=1))
    cfg = write_cfg(work, method, CONFIGS[method], dirs)
    merge(cfg, work / f"again-{method}", mode="stream")  # a second run, same seed
    assert same(ref, tensors(work / f"again-{method}"))


# ---- numbers against numpy -------------------------------------------------------------------

def np_ties(base, models, densities, weights):
    """TIES as published (trim per tensor, elect sign of the weighted sum, disjoint mean)."""
    b = base.astype(np.float32)
    trimmed = []
    for m, d in zip(models, densities):
        tv = m.astype(np.float32) - b
        if d < 1:
            k = max(1, int(d * tv.size))  # mergekit 0.1.5's count for a density from the YAML
            order = np.argsort(-np.abs(tv).ravel(), kind="stable")
            keep = np.zeros(tv.size, bool)
            keep[order[:k]] = True
            tv = tv * keep.reshape(tv.shape)
        trimmed.append(tv)
    wd = [w * t for w, t in zip(weights, trimmed)]
    sign = np.where(sum(wd) >= 0, 1.0, -1.0)
    agree = [np.sign(x) == sign for x in wd]
    mixed = sum(np.where(a, x, 0) for a, x in zip(agree, wd))
    div = sum(np.where(a, w, 0) for a, w in zip(agree, weights))
    return b + mixed / np.where(div == 0, 1, div)


def test_ties_matches_formula_with_gradients_and_filters(work, dirs):
    out = merged(work, dirs, "ties", "stream")
    base, m1, m2 = (tensors(dirs[k]) for k in ("m0", "m1", "m2"))
    for name, got in out.items():
        if name.startswith("model.layers."):
            t = int(name.split(".")[2]) / 2  # 3 layers: t = 0, 0.5, 1
        else:
            t = 0.0  # embeddings, final norm, lm_head (mergekit 0.1.5)
        d1 = 1 + (0.5 - 1) * t  # gradient [1, 0.5]
        w2 = 0.3 if "mlp" in name else 0.5  # filter list
        want = np_ties(base[name], [m1[name], m2[name]], [d1, 0.5], [0.6, w2])
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=name)


def test_linear_bf16_loads_in_transformers(work, dirs):
    import torch
    from transformers import AutoModelForCausalLM
    cfg = work / "linear.yml"
    cfg.write_text(f"models:\n  - {{model: {dirs['m0']}, parameters: {{weight: 1}}}}\n"
                   f"  - {{model: {dirs['m1']}, parameters: {{weight: 3}}}}\nmerge_method: linear\n"
                   "out_dtype: bfloat16\n")
    out = work / "linear-out"
    merge(cfg, out, mode="memory")
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    a, b = tensors(dirs["m0"]), tensors(dirs["m1"])
    sd = model.state_dict()
    for name in a:
        want = (a[name] + 3 * b[name]) / 4
        np.testing.assert_allclose(sd[name].float().numpy(), want, rtol=1e-2, atol=1e-3, err_msg=name)
    assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 97)


def test_passthrough_slices_stack_layers(work, dirs):
    from transformers import AutoModelForCausalLM
    cfg = work / "stack.yml"
    cfg.write_text(f"slices:\n  - sources: [{{model: {dirs['m0']}, layer_range: [0, 3]}}]\n"
                   f"  - sources: [{{model: {dirs['m1']}, layer_range: [1, 3], parameters: {{scale: 0.5}}}}]\n"
                   "merge_method: passthrough\n")
    out = work / "stack-out"
    merge(cfg, out, mode="stream")
    conf = json.loads((out / "config.json").read_text())
    assert conf["num_hidden_layers"] == 5
    got, a, b = tensors(out), tensors(dirs["m0"]), tensors(dirs["m1"])
    np.testing.assert_array_equal(got["model.layers.2.mlp.up_proj.weight"], a["model.layers.2.mlp.up_proj.weight"])
    np.testing.assert_array_equal(got["model.layers.4.mlp.up_proj.weight"], 0.5 * b["model.layers.2.mlp.up_proj.weight"])
    np.testing.assert_array_equal(got["model.embed_tokens.weight"], a["model.embed_tokens.weight"])
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 5


# ---- tokenizers ------------------------------------------------------------------------------

def with_tokenizer(src, dst, vocab):
    from tokenizers import Tokenizer, models, pre_tokenizers
    shutil.copytree(src, dst)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(dst / "tokenizer.json"))
    (dst / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "t0"}))
    return dst


@pytest.mark.parametrize("mode", ["stream", "memory"])
def test_union_tokenizer_fills_missing_rows(work, dirs, mode):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    plain = {f"t{i}": i for i in range(97)}
    odd = dict(plain)
    del odd["t5"]
    odd["xnew"] = 5  # model 1 lacks t5 and has a token nobody else has
    root = work / f"tok-{mode}"
    b = with_tokenizer(dirs["m0"], root / "b", plain)
    m1 = with_tokenizer(dirs["m1"], root / "m1", odd)
    m2 = with_tokenizer(dirs["m2"], root / "m2", plain)
    cfg = root / "cfg.yml"
    cfg.write_text(f"models:\n  - {{model: {m1}, parameters: {{weight: 1}}}}\n  - {{model: {m2}, parameters: {{weight: 1}}}}\n"
                   f"merge_method: task_arithmetic\nbase_model: {b}\ntokenizer_source: union\nchat_template: chatml\n")
    out = root / "out"
    merge(cfg, out, mode=mode)
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == 98 and tok.convert_tokens_to_ids("xnew") == 97
    assert "<|im_start|>" in (out / "chat_template.jinja").read_text()
    got = tensors(out)
    B, M1, M2 = tensors(dirs["m0"]), tensors(dirs["m1"]), tensors(dirs["m2"])
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        e = got[name]
        assert e.shape == (98, 32)
        rows = [r for r in range(97) if r != 5]
        want = B[name][rows] + (M1[name][rows] - B[name][rows]) + (M2[name][rows] - B[name][rows])
        np.testing.assert_allclose(e[rows], want, rtol=1e-6, atol=1e-6)
        # t5: model 1 lacks it; base has it -> model 1 gets the base row (no change from it)
        np.testing.assert_allclose(e[5], M2[name][5], rtol=1e-6, atol=1e-6)
        # xnew: only model 1 has it -> every model gets model 1's row, task vectors vanish
        np.testing.assert_allclose(e[97], M1[name][5], rtol=1e-6, atol=1e-6)
    assert AutoModelForCausalLM.from_pretrained(out).config.vocab_size == 98


# ---- outputs ---------------------------------------------------------------------------------

def test_orbax_copy(work, dirs):
    from jmerge.io import load_model
    from jmerge.io.orbax_io import is_orbax_dir
    cfg = write_cfg(work, "slerp", CONFIGS["slerp"], dirs)
    out, ob = work / "ob-hf", work / "ob-orbax"
    merge(cfg, out, mode="memory", orbax=ob)
    assert is_orbax_dir(ob)
    a, b = load_model(out).params, load_model(ob).params
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# ---- bad input -------------------------------------------------------------------------------

def cli(capsys, command, *args):
    from jmerge.cli import check, merge
    capsys.readouterr()
    rc = run((merge if command == "merge" else check).main, [str(a) for a in args])
    return rc, capsys.readouterr()


def expect_error(capsys, cfg, out, needle, *extra):
    rc, cap = cli(capsys, "merge", cfg, out, "-q", *extra)
    err = cap.err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert needle in err, err
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.*")), "temporary output left behind"


@pytest.mark.parametrize("text, needle", [
    ("merge_method: ties\nmodels:\n  - model: {m1}\n   parameters: {{}}\n", "YAML syntax error at line 4"),
    ("merge_method: tis\nbase_model: {m0}\nmodels: [{{model: {m1}}}]\n", "did you mean 'ties'"),
    ("merge_method: ties\nbase_model: {m0}\nmodels: [{{model: {m1}, parameters: {{weight: 1, density: 0}}}}]\n",
     "density must be in (0, 1]"),
    ("merge_method: slerp\nbase_model: {m0}\nmodels: [{{model: {m1}}}, {{model: {m2}}}]\nparameters: {{t: 0.5}}\n",
     "exactly two models"),
    ("merge_method: ties\nmodels: [{{model: {m1}, parameters: {{weight: 1}}}}]\n", "needs a base_model"),
    ("merge_method: passthrough\nslices:\n  - sources: [{{model: {m1}, layer_range: [1, 4]}}]\n",
     "out of bounds"),
    ("merge_method: ties\nbase_model: {m0}\nmodels: [{{model: {q}, parameters: {{weight: 1}}}}]\n",
     "family qwen3 differs"),
    ("merge_method: ties\nbase_model: {m0}\nmodels: [{{model: /nonexistent/x, parameters: {{weight: 1}}}}]\n",
     "no such file"),
])
def test_bad_config_one_line(capsys, tmp_path, dirs, tiny_model_dir, text, needle):
    cfg = tmp_path / "c.yml"
    cfg.write_text(text.format(q=tiny_model_dir("qwen3"), **dirs))
    expect_error(capsys, cfg, tmp_path / "out", needle)


def test_check_lists_every_problem(capsys, tmp_path, dirs, tiny_model_dir):
    cfg = tmp_path / "c.yml"
    cfg.write_text(f"merge_method: ties\nbase_model: {dirs['m0']}\nmodels:\n"
                   f"  - {{model: {tiny_model_dir('qwen3')}, parameters: {{weight: 1}}}}\n"
                   f"  - {{model: {tiny_model_dir('mistral')}, parameters: {{weight: 1}}}}\n")
    rc, cap = cli(capsys, "check", cfg)
    assert rc == 2 and "family qwen3" in cap.err and "family mistral" in cap.err and "head_dim" in cap.err
    good = write_cfg(tmp_path, "ties", CONFIGS["ties"], dirs)
    rc, cap = cli(capsys, "check", good)
    assert rc == 0 and cap.out.startswith("ok: ties, 3 models"), cap.err


def test_output_exists(capsys, tmp_path, dirs):
    cfg = write_cfg(tmp_path, "slerp", CONFIGS["slerp"], dirs)
    out = tmp_path / "out"
    out.mkdir()
    rc, cap = cli(capsys, "merge", cfg, out, "-q")
    assert rc == 2 and "already exists" in cap.err and not any(out.iterdir())
    rc, cap = cli(capsys, "merge", cfg, out, "-q", "--force", "--stream")
    assert rc == 0 and (out / "model.safetensors").exists()


@pytest.mark.parametrize("mode", ["--stream", "--in-memory"])
def test_disk_full_leaves_nothing(capsys, tmp_path, dirs, monkeypatch, mode):
    def full(path, items, arrays, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("jmerge.io.hf.write_file", full)
    cfg = write_cfg(tmp_path, "slerp", CONFIGS["slerp"], dirs)
    expect_error(capsys, cfg, tmp_path / "out", "disk full", mode)


@pytest.mark.parametrize("mode", ["--stream", "--in-memory"])
def test_nonfinite_input(capsys, tmp_path, dirs, mode):
    bad = copy_with_nan(dirs["m1"], tmp_path / "bad")
    cfg = tmp_path / "c.yml"
    cfg.write_text(f"models: [{{model: {dirs['m0']}}}, {{model: {bad}}}]\nmerge_method: slerp\n"
                   f"base_model: {dirs['m0']}\nparameters: {{t: 0.5}}\n")
    expect_error(capsys, cfg, tmp_path / "out", "model.layers.1.mlp.up_proj.weight has NaN/Inf", mode)


# ---- inspect ---------------------------------------------------------------------------------

def test_inspect_known_task_vectors(capsys, tmp_path, dirs):
    from safetensors.numpy import save_file
    from jmerge.cli.inspect import main as inspect_main
    base = tensors(dirs["m0"])
    rng = np.random.default_rng(0)
    delta = {n: rng.standard_normal(x.shape).astype(np.float32) * 0.01 for n, x in base.items()}
    paths = {}
    for name, scale in (("a", 1.0), ("b", -1.0), ("c", 2.0)):
        d = tmp_path / name
        shutil.copytree(dirs["m0"], d)
        save_file({n: (x + np.float32(scale) * delta[n]).astype(np.float32) for n, x in base.items()},
                  d / "model.safetensors", metadata={"format": "pt"})
        paths[name] = d
    out = tmp_path / "report"
    rc = run(inspect_main, ["--base", str(dirs["m0"]), "--models", *map(str, paths.values()),
                                "--out", str(out)])
    assert rc == 0
    r = json.loads((out / "report.json").read_text())
    cos, conflict = np.array(r["cosine"]), np.array(r["sign_conflict"])
    # tau_b = -tau_a, tau_c = 2 tau_a (up to float32 rounding of theta + delta - theta)
    np.testing.assert_allclose(cos, [[1, -1, 1], [-1, 1, -1], [1, -1, 1]], atol=1e-3)
    assert conflict[0, 1] > 0.99 and conflict[0, 2] < 0.01
    na, nb, nc = (r["norm"][str(p)] for p in paths.values())
    assert nc == pytest.approx(2 * na, rel=1e-3) and nb == pytest.approx(na, rel=1e-3)
    assert r["rows"] == ["embed", "0", "1", "2", "head"]
    assert (out / "heatmap.png").stat().st_size > 1000


def test_lora_reference_as_model(tmp_path, dirs):
    from jmerge.io import load_model
    from test_io import _write_adapter
    base = load_model(dirs["m0"])
    _write_adapter(tmp_path / "ad", base.cfg)
    cfg = tmp_path / "c.yml"
    cfg.write_text(f"models: [{{model: '{dirs['m0']}+{tmp_path / 'ad'}', parameters: {{weight: 0.5}}}}]\n"
                   f"merge_method: task_arithmetic\nbase_model: {dirs['m0']}\n")
    merge(cfg, tmp_path / "out", mode="stream")
    got = tensors(tmp_path / "out")["model.layers.1.self_attn.q_proj.weight"]
    q0 = np.asarray(base.params["model"]["layers"]["self_attn"]["q_proj"]["weight"][1])
    q1 = np.asarray(load_model(f"{dirs['m0']}+{tmp_path / 'ad'}").params["model"]["layers"]["self_attn"]["q_proj"]["weight"][1])
    np.testing.assert_allclose(got, q0 + 0.5 * (q1 - q0), rtol=1e-5, atol=1e-6)


def test_somf_mask_file(tmp_path, dirs):
    from safetensors.numpy import save_file
    base, m1 = tensors(dirs["m0"]), tensors(dirs["m1"])
    masks = {n: (np.arange(x.size) % 2 == 0).reshape(x.shape).astype(np.float32) for n, x in base.items()}
    save_file(masks, tmp_path / "mask.safetensors")
    cfg = tmp_path / "c.yml"
    cfg.write_text(f"models: [{{model: {dirs['m1']}, parameters: {{mask: mask.safetensors}}}}]\n"
                   f"merge_method: somf\nbase_model: {dirs['m0']}\n")
    merge(cfg, tmp_path / "out", mode="stream")
    got = tensors(tmp_path / "out")
    for n in base:  # theta_0 + tau * m / mean(m), mean(m) = 1/2 (even sizes)
        np.testing.assert_allclose(got[n], base[n] + (m1[n] - base[n]) * masks[n] * 2, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32, jnp.int8, jnp.bool_])
def test_concat_bits_is_concatenate(dtype):
    from jmerge.engine.memory import concat_bits
    xs = [(jnp.arange(6 * i, 6 * i + 6).reshape(1, 2, 3) * (-1) ** i).astype(dtype) for i in range(3)]
    xs[1] = xs[1].at[0, 0, 0].set(jnp.nan) if jnp.issubdtype(dtype, jnp.floating) else xs[1]
    got = concat_bits(xs)
    assert got.dtype == dtype and got.shape == (3, 2, 3)
    np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)),
                                  np.asarray(jnp.concatenate(xs).astype(jnp.float32)))


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_exported_programs_same_bits(work, dirs, method, tmp_path):
    """Traced per-tensor programs kept across runs (jax.export) give the stream merge's bits
    when written, when read back, and when an artifact is corrupt (traced afresh and rewritten)."""
    from jmerge.engine import MergeOptions
    cached = MergeOptions(mode="stream", export_cache=tmp_path / "exported")
    ref = merged(work, dirs, method, "stream")
    cfg = write_cfg(work, method, CONFIGS[method], dirs)
    merge(cfg, tmp_path / "cold", cached)
    files = sorted((tmp_path / "exported").glob(f"{method}-*.jax"))
    assert files, "no program was exported"
    stamps = {f: f.stat().st_mtime_ns for f in files}
    merge(cfg, tmp_path / "warm", cached)
    assert {f: f.stat().st_mtime_ns for f in files} == stamps  # read, not rewritten
    files[0].write_bytes(b"not a program")
    merge(cfg, tmp_path / "mended", cached)
    assert files[0].read_bytes() != b"not a program"
    for d in ("cold", "warm", "mended"):
        assert same(ref, tensors(tmp_path / d)), d


def test_console_merge_exits_fast_with_its_code(tmp_path, work, dirs):
    """`python -m jmerge merge` leaves by os._exit once the output is in place; its exit codes
    and messages are the command's."""
    import subprocess
    import sys
    cfg = write_cfg(tmp_path, "linear", CONFIGS["linear"], dirs)
    env = dict(os.environ, JMERGE_NO_COMPILE_CACHE="1")
    cmd = [sys.executable, "-m", "jmerge", "merge", str(cfg), str(tmp_path / "out"), "-q"]
    ok = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert ok.returncode == 0 and "merged ->" in ok.stdout, ok.stderr
    assert same(tensors(tmp_path / "out"), merged(work, dirs, "linear", "stream"))
    again = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert again.returncode == 2 and again.stderr.strip().endswith("already exists (pass --force to replace it)")
