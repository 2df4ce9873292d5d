"""`jmerge stats`: Fisher, SNIP and Gram files checked against torch on the transformers model,
and read by the fisher / regmean / led merges."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file

from jmerge.cli import main

torch = pytest.importorskip("torch")

ROWS = [{"prompt": "What is 2 plus 2?", "response": "The answer is 4."},
        {"prompt": "hi", "response": "Hello there, how can I help?"},
        {"prompt": "Name a colour.", "response": "Blue."},
        {"prompt": "Count to five please", "response": "1, 2, 3, 4, 5"},
        {"prompt": "Say yes", "response": "yes"},
        {"prompt": "Spell cat backwards.", "response": "tac"}]
BATCH = 4  # six rows: a full batch and a short one, each padded to the 8 test devices' rows
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _run(capsys, *args):
    capsys.readouterr()
    rc = main(["stats", *map(str, args), "-q"])
    out = capsys.readouterr()
    return rc, out.out.strip(), out.err.strip()


def _with_tokenizer(model_dir, tok_dir, dest):
    """`model_dir`'s weights beside the tiny character tokenizer of `tok_dir`."""
    shutil.copytree(model_dir, dest)
    for f in tok_dir.iterdir():
        if "token" in f.name or "chat" in f.name:
            shutil.copy2(f, dest / f.name)
    return dest


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tiny_tok_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("stats")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    tok = tiny_tok_dir["chat"]
    return dict(root=root, data=data, m0=tok,
                m1=_with_tokenizer(tiny_model_dir("llama", 1), tok, root / "m1"),
                qwen3=_with_tokenizer(tiny_model_dir("qwen3"), tok, root / "qwen3"))


def _torch_batches(model_dir, n_batches=None):
    """The data file's order in batches of BATCH, as the command takes them: (ids, attention
    mask, loss mask), right-padded."""
    from jmerge import data
    from jmerge.generate import load_tokenizer
    exs = data.encode_pairs(load_tokenizer(model_dir), ROWS, 512)
    out = []
    for i in range(0, len(exs), BATCH):
        b = data.collate(exs[i:i + BATCH], max(len(e.ids) for e in exs[i:i + BATCH]), len(exs[i:i + BATCH]))
        out.append(tuple(torch.tensor(b[k]).long() for k in ("input_ids", "attention_mask", "loss_mask")))
    return out[:n_batches]


def _torch_model(model_dir):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def test_fisher_and_snip_equal_torch(capsys, caplog, setup):
    import jax
    out = setup["root"] / "fs"
    with jax.log_compiles(True), caplog.at_level("WARNING"):
        rc, summary, err = _run(capsys, setup["m0"], setup["data"], out, "--kind", "fisher,snip",
                                "--batch-size", BATCH)
    assert rc == 0, err
    # both batches (one full, one short) run one program
    assert sum("Compiling jit(_step)" in r.getMessage() for r in caplog.records) == 1
    assert "2 batches" in summary
    assert sorted(p.name for p in out.iterdir()) == ["fisher.safetensors", "scores.safetensors", "stats.json"]
    fisher, scores = load_file(out / "fisher.safetensors"), load_file(out / "scores.safetensors")

    model = _torch_model(setup["m0"])
    params = dict(model.named_parameters())
    fsum = {n: np.zeros(p.shape) for n, p in params.items()}
    gsum = {n: np.zeros(p.shape) for n, p in params.items()}
    targets = 0
    batches = _torch_batches(setup["m0"])
    for ids, attn, loss in batches:
        model.zero_grad()
        logits = model(input_ids=ids, attention_mask=attn).logits
        lp = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, ids[:, 1:, None])[..., 0]
        ce = -(lp * loss[:, 1:]).sum()
        ce.backward()
        n = int(loss.sum())
        targets += n
        for name, p in params.items():
            g = p.grad.double().numpy()
            fsum[name] += (g / n) ** 2
            gsum[name] += g
    assert set(fisher) == set(scores) == set(params)
    for name, p in params.items():
        want_f = fsum[name] / len(batches)
        want_s = np.abs(p.detach().double().numpy() * gsum[name] / targets)
        for got, want, what in ((fisher[name], want_f, "fisher"), (scores[name], want_s, "snip")):
            assert got.dtype == np.float32 and got.shape == want.shape
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * np.abs(want).max(), err_msg=f"{what} {name}")
    report = json.loads((out / "stats.json").read_text())
    assert report["kinds"] == ["fisher", "snip"] and report["batches"] == 2
    assert report["response_tokens"] == targets
    assert report["tokens"] == sum(int(a.sum()) for _, a, _ in batches)


@pytest.mark.parametrize("family", ["m0", "qwen3"])  # llama; qwen3: q/k norms, heads x head_dim != hidden
def test_gram_equals_torch_linear_inputs(capsys, setup, family):
    out = setup["root"] / f"gram-{family}"
    rc, _, err = _run(capsys, setup[family], setup["data"], out, "--kind", "gram", "--batch-size", BATCH,
                      "--batches", 1)
    assert rc == 0, err
    grams = load_file(out / "grams.safetensors")
    model = _torch_model(setup[family])
    seen, hooks = {}, []
    for name, mod in model.named_modules():
        if name.split("layers.", 1)[-1].split(".", 1)[-1] in LINEARS:
            hooks.append(mod.register_forward_pre_hook(lambda m, args, name=name: seen.__setitem__(name, args[0])))
    (ids, attn, _), = _torch_batches(setup[family], 1)  # --batches 1: the first only
    with torch.no_grad():
        model(input_ids=ids, attention_mask=attn)
    for h in hooks:
        h.remove()
    keep = attn.bool().numpy()
    n_layers = model.config.num_hidden_layers
    assert set(grams) == {f"model.layers.{i}.{m}.weight" for i in range(n_layers) for m in LINEARS}
    for name, x in seen.items():
        x = x.double().numpy()[keep]  # the non-padding tokens [N, in]
        got = grams[f"{name}.weight"]
        assert got.dtype == np.float32 and got.shape == (x.shape[1], x.shape[1])
        np.testing.assert_allclose(got, x.T @ x, rtol=1e-4, atol=1e-5 * np.abs(x.T @ x).max(), err_msg=name)
    assert json.loads((out / "stats.json").read_text())["tokens"] == int(keep.sum())


def test_written_dirs_drive_the_merges(capsys, setup):
    from jmerge.cli import merge, run
    root = setup["root"] / "e2e"
    root.mkdir()
    for m in ("m0", "m1"):
        rc, _, err = _run(capsys, setup[m], setup["data"], root / f"s-{m}", "--batch-size", 3)
        assert rc == 0, err
    m0, m1 = setup["m0"], setup["m1"]
    configs = {
        "regmean": f"models: [{{model: {m0}, parameters: {{grams: s-m0}}}},\n"
                   f"         {{model: {m1}, parameters: {{grams: s-m1}}}}]\nmerge_method: regmean\n",
        "fisher": f"models: [{{model: {m0}, parameters: {{fisher: s-m0}}}},\n"
                  f"         {{model: {m1}, parameters: {{fisher: s-m1}}}}]\nmerge_method: fisher\n",
        "led": f"base_model: {m0}\nmodels: [{{model: {m1}, parameters: {{scores: s-m1, "
               f"base_scores: s-m0/scores.safetensors, density: 0.5}}}}]\nmerge_method: led\n",
    }
    for method, text in configs.items():
        (root / f"{method}.yml").write_text(text)
        capsys.readouterr()
        rc = run(merge.main, [str(root / f"{method}.yml"), str(root / f"out-{method}"), "-q"])
        assert rc == 0, f"{method}: {capsys.readouterr().err}"
        assert (root / f"out-{method}" / "config.json").exists()
    a, b = load_file(m0 / "model.safetensors"), load_file(m1 / "model.safetensors")
    got = load_file(root / "out-regmean" / "model.safetensors")
    name = "model.layers.0.mlp.down_proj.weight"  # a Gram-weighted solve, not the plain mean
    assert not np.allclose(got[name], (a[name] + b[name]) / 2, atol=1e-4)
    np.testing.assert_allclose(got["model.norm.weight"], (a["model.norm.weight"] + b["model.norm.weight"]) / 2,
                               rtol=1e-6)


@pytest.mark.parametrize("case, needle", [
    ("missing", "no such data file"), ("empty", "no records"), ("kind", "unknown kind"),
    ("batches0", "positive integer"), ("batches-", "positive integer"), ("out=model", "refusing to write"),
    ("out=data", "refusing to write"),
])
def test_bad_input_one_line(capsys, setup, tmp_path, case, needle):
    model, data, out, extra = setup["m0"], setup["data"], tmp_path / "o", []
    if case == "missing":
        data = tmp_path / "nope.jsonl"
    elif case == "empty":
        data = tmp_path / "empty.jsonl"
        data.write_text("\n")
    elif case == "kind":
        extra = ["--kind", "fisher,hessian"]
    elif case.startswith("batches"):
        extra = ["--batches", "0" if case == "batches0" else "-3"]
    elif case == "out=model":
        out = model
    else:
        out = data
    before = sorted(p.name for p in tmp_path.iterdir())
    rc, _, err = _run(capsys, model, data, out, *extra, "--force")
    assert rc == 2 and needle in err.lower() and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
    assert (model / "config.json").exists() and setup["data"].exists()
