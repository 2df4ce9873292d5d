"""`jmerge extract-lora`: truncated-SVD adapters of MODEL − BASE, checked against numpy, PEFT and jmerge."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jmerge.cli import main

RANK = 3
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _run(capsys, *args):
    capsys.readouterr()
    rc = main(["extract-lora", *map(str, args), "-q"])
    out = capsys.readouterr()
    return rc, out.out.strip(), out.err.strip()


def _linear_names(tensors):
    return [n for n in tensors if n.startswith("model.layers.") and n.rsplit(".", 2)[-2] in
            {m.split(".")[1] for m in LINEARS}]


@pytest.fixture(scope="module")
def pair(tiny_model_dir, tmp_path_factory):
    """(base dir, model dir, {tensor: exact rank-RANK delta}) : MODEL = BASE + B0·A0 on every linear."""
    base = tiny_model_dir("llama")
    d = tmp_path_factory.mktemp("lowrank") / "model"
    shutil.copytree(base, d)
    t = load_file(d / "model.safetensors")
    rng = np.random.default_rng(0)
    deltas = {}
    for n in _linear_names(t):
        o, i = t[n].shape
        deltas[n] = (0.1 * rng.standard_normal((o, RANK)) @ rng.standard_normal((RANK, i))).astype(np.float32)
        t[n] = t[n] + deltas[n]
    save_file(t, d / "model.safetensors", metadata={"format": "pt"})
    return base, d, deltas


@pytest.fixture(scope="module")
def extracted(pair, tmp_path_factory):
    base, model, _ = pair
    out = tmp_path_factory.mktemp("ad") / "adapter"
    assert main(["extract-lora", str(model), str(base), str(out), "--rank", str(RANK), "-q"]) == 0
    return out


def test_exact_low_rank_delta_reconstructs(pair, extracted):
    _, _, deltas = pair
    report = json.loads((extracted / "extract_report.json").read_text())
    assert report["rank"] == RANK and len(report["relative_error"]) == len(deltas)
    assert report["max_relative_error"] < 1e-5
    ad = load_file(extracted / "adapter_model.safetensors")
    cfg = json.loads((extracted / "adapter_config.json").read_text())
    assert cfg["r"] == RANK and cfg["lora_alpha"] == RANK
    assert sorted(cfg["target_modules"]) == sorted(m.split(".")[1] for m in LINEARS)
    for n, dw in deltas.items():
        pre = "base_model.model." + n.removesuffix(".weight")
        a, b = ad[f"{pre}.lora_A.weight"], ad[f"{pre}.lora_B.weight"]
        assert a.shape == (RANK, dw.shape[1]) and b.shape == (dw.shape[0], RANK)
        assert np.linalg.norm(dw - b @ a) / np.linalg.norm(dw) < 1e-5
    assert not any("embed" in k or "lm_head" in k or "norm" in k for k in ad)


def test_lower_rank_error_is_the_svd_tail(capsys, pair, tmp_path):
    base, model, deltas = pair
    rc, _, err = _run(capsys, model, base, tmp_path / "r1", "--rank", 1, "--modules", "q_proj,down_proj")
    assert rc == 0, err
    report = json.loads((tmp_path / "r1" / "extract_report.json").read_text())
    assert set(report["modules"]) == {"q_proj", "down_proj"}
    assert len(report["relative_error"]) == 2 * 3
    for key, got in report["relative_error"].items():
        s = np.linalg.svd(deltas[key + ".weight"].astype(np.float64), compute_uv=False)
        want = np.sqrt(np.sum(s[1:] ** 2)) / np.sqrt(np.sum(s ** 2))
        assert got == pytest.approx(want, rel=1e-4), key


def test_peft_loads_and_merges_to_model(pair, extracted):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM
    base, model, _ = pair
    ad = load_file(extracted / "adapter_model.safetensors")
    wrapped = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(extracted))
    merged = wrapped.merge_and_unload().eval()
    sd = {k: v.detach().numpy() for k, v in merged.state_dict().items()}
    bt = load_file(base / "model.safetensors")
    for n in _linear_names(bt):
        pre = "base_model.model." + n.removesuffix(".weight")
        want = bt[n] + ad[f"{pre}.lora_B.weight"] @ ad[f"{pre}.lora_A.weight"]
        np.testing.assert_allclose(sd[n], want, rtol=1e-5, atol=1e-6)
    ids = torch.tensor([[1, 5, 9, 33, 2, 70]])
    ref = AutoModelForCausalLM.from_pretrained(model).eval()
    with torch.no_grad():
        np.testing.assert_allclose(merged(ids).logits.numpy(), ref(ids).logits.numpy(), rtol=1e-4, atol=1e-4)


def test_jmerge_reads_base_plus_adapter(capsys, pair, extracted, tmp_path):
    base, model, _ = pair
    capsys.readouterr()
    assert main(["convert", f"{base}+{extracted}", str(tmp_path / "back"), "-q"]) == 0
    got, want = load_file(tmp_path / "back" / "model.safetensors"), load_file(model / "model.safetensors")
    for n in _linear_names(want):
        np.testing.assert_allclose(got[n], want[n], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rank, needle", [(0, "positive integer"), (-2, "positive integer"),
                                          (33, "exceeds the rank bound")])
def test_bad_rank(capsys, pair, tmp_path, rank, needle):
    base, model, _ = pair
    rc, _, err = _run(capsys, model, base, tmp_path / "o", "--rank", rank)
    assert rc == 2 and needle in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o*"))


def test_nonfinite_delta_named(capsys, pair, tmp_path):
    from conftest import copy_with_nan
    base, model, _ = pair
    bad = copy_with_nan(model, tmp_path / "nan", "model.layers.2.self_attn.v_proj.weight")
    rc, _, err = _run(capsys, bad, base, tmp_path / "o", "--rank", 2)
    assert rc == 2 and "model.layers.2.self_attn.v_proj.weight" in err and "NaN" in err, err
    assert not (tmp_path / "o").exists()


def test_different_architectures(capsys, pair, tiny_model_dir, tmp_path):
    base, _, _ = pair
    rc, _, err = _run(capsys, tiny_model_dir("qwen2"), base, tmp_path / "o", "--rank", 2)
    assert rc == 2 and "different architectures" in err, err
    assert not (tmp_path / "o").exists()


def test_existing_out_needs_force(capsys, pair, tmp_path):
    base, model, _ = pair
    (tmp_path / "o").mkdir()
    rc, _, err = _run(capsys, model, base, tmp_path / "o", "--rank", 2)
    assert rc == 2 and "already exists" in err, err
    assert list((tmp_path / "o").iterdir()) == []
    rc, _, err = _run(capsys, model, base, tmp_path / "o", "--rank", 2, "--modules", "v_proj", "--force")
    assert rc == 0, err
    assert json.loads((tmp_path / "o" / "adapter_config.json").read_text())["target_modules"] == ["v_proj"]


def test_unknown_module(capsys, pair, tmp_path):
    base, model, _ = pair
    rc, _, err = _run(capsys, model, base, tmp_path / "o", "--rank", 2, "--modules", "embed_tokens")
    assert rc == 2 and "unknown linear module" in err, err


def test_layers_dealt_over_devices_give_the_same_adapter(pair, extracted, tmp_path):
    base, model, _ = pair  # 3 layers over a 3-device mesh: each device factors its own layer
    from jmerge.lora_extract import extract_lora
    extract_lora(model, base, tmp_path / "o", rank=RANK, mesh={"data": 1, "fsdp": 3, "tensor": 1}, progress=False)
    one = load_file(extracted / "adapter_model.safetensors")
    many = load_file(tmp_path / "o" / "adapter_model.safetensors")
    assert one.keys() == many.keys()
    for k in one:  # singular vectors are defined up to sign: compare the products
        if ".lora_A." in k:
            kb = k.replace(".lora_A.", ".lora_B.")
            np.testing.assert_allclose(many[kb] @ many[k], one[kb] @ one[k], rtol=1e-4, atol=1e-5)
