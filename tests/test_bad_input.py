"""Bad input to `jmerge convert`: one clear line on stderr, exit code 2, nothing written."""

import json
import struct
import subprocess
import sys

import numpy as np

from jmerge.cli import main
from jmerge.io.safetensors_io import Checkpoint


def convert(capsys, src, out, *extra):
    capsys.readouterr()  # drop what fixtures printed (transformers' save progress)
    rc = main(["convert", str(src), str(out), "-q", *extra])
    err = capsys.readouterr().err.strip()
    return rc, err


def _rewrite(d, fn):
    """Rewrite model.safetensors through fn(dict of arrays) -> dict of arrays."""
    from safetensors.numpy import save_file
    ck = Checkpoint(d)
    tensors = {n: np.array(ck.array(n)) for n in ck.names()}
    save_file(fn(tensors), d / "model.safetensors", metadata={"format": "pt"})


def _expect(capsys, src, out, needle, *extra):
    rc, err = convert(capsys, src, out, *extra)
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert needle in err, err
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.tmp*")), "temporary output left behind"


def test_missing_path(capsys, tmp_path):
    _expect(capsys, tmp_path / "nope", tmp_path / "out", "no such file")


def test_truncated_safetensors(capsys, model, tmp_path):
    f = model / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    _expect(capsys, model, tmp_path / "out", "truncated")


def test_header_size_lie(capsys, model, tmp_path):
    f = model / "model.safetensors"
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [s * 2 for s in header[name]["shape"]]
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    f.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])
    _expect(capsys, model, tmp_path / "out", "needs")


def test_huge_header_length(capsys, model, tmp_path):
    f = model / "model.safetensors"
    raw = f.read_bytes()
    f.write_bytes(struct.pack("<Q", 10 ** 12) + raw[8:])
    _expect(capsys, model, tmp_path / "out", "header length")


def test_missing_tensor(capsys, model, tmp_path):
    _rewrite(model, lambda t: {k: v for k, v in t.items() if k != "model.layers.1.mlp.up_proj.weight"})
    _expect(capsys, model, tmp_path / "out", "missing tensor model.layers.1.mlp.up_proj.weight")


def test_unexpected_tensor(capsys, model, tmp_path):
    _rewrite(model, lambda t: {**t, "model.layers.0.extra.weight": np.zeros(3, np.float32)})
    _expect(capsys, model, tmp_path / "out", "unexpected tensor model.layers.0.extra.weight")


def test_shape_mismatch_with_config(capsys, model, tmp_path):
    cfg = json.loads((model / "config.json").read_text())
    cfg["intermediate_size"] = 50
    (model / "config.json").write_text(json.dumps(cfg))
    _expect(capsys, model, tmp_path / "out", "config implies")


def test_unsupported_architecture(capsys, model, tmp_path):
    cfg = json.loads((model / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["GPT2LMHeadModel"], "gpt2"
    (model / "config.json").write_text(json.dumps(cfg))
    _expect(capsys, model, tmp_path / "out", "supported: LlamaForCausalLM, MistralForCausalLM")


def test_nonfinite_weights_refused_unless_allowed(capsys, model, tmp_path):
    def poison(t):
        t["model.layers.2.self_attn.o_proj.weight"][0, 0] = np.nan
        return t
    _rewrite(model, poison)
    _expect(capsys, model, tmp_path / "out", "model.layers.2.self_attn.o_proj.weight has NaN/Inf")
    rc, err = convert(capsys, model, tmp_path / "ok", "--allow-nonfinite")
    assert rc == 0 and (tmp_path / "ok" / "model.safetensors").exists(), err


def test_pickle_refused(capsys, model, tmp_path):
    (model / "model.safetensors").unlink()
    (model / "pytorch_model.bin").write_bytes(b"not really a pickle")
    _expect(capsys, model, tmp_path / "out", "pickle checkpoints are refused")
    _expect(capsys, model / "pytorch_model.bin", tmp_path / "out", "pickle checkpoints are refused")


def test_existing_output_needs_force(capsys, model, tmp_path):
    (tmp_path / "out").mkdir()
    rc, err = convert(capsys, model, tmp_path / "out")
    assert rc == 2 and "--force" in err
    rc, err = convert(capsys, model, tmp_path / "out", "--force")
    assert rc == 0 and (tmp_path / "out" / "config.json").exists()


def test_console_entry_point_exit_code(tmp_path):
    """The real process: one stderr line, exit 2."""
    r = subprocess.run([sys.executable, "-m", "jmerge", "convert", str(tmp_path / "nope"), str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
