"""Outputs never cost data: an output that is, holds or lies inside an input (or the working
directory) is refused, `--force` or not; a failed or interrupted run leaves no temporary and the
old output as it was; a bug is one line."""

import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jmerge.cli import main

LINEAR = "merge_method: linear\nmodels:\n  - {{model: {a}, parameters: {{weight: 0.5}}}}\n" \
         "  - {{model: {b}, parameters: {{weight: 0.5}}}}\n"


def snapshot(root: Path) -> dict:
    """Every path under root with its content hash (None for a directory, the target for a link):
    equal snapshots mean nothing was changed, removed or left behind."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_dir():
            out[rel] = None
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def cli(capsys, *args):
    capsys.readouterr()  # drop what fixtures printed
    rc = main([str(a) for a in args])
    return rc, capsys.readouterr().err.strip()


def refused(capsys, root, needle, *args):
    """The command exits 2 with one line naming the problem, and nothing under root changed."""
    before = snapshot(root)
    rc, err = cli(capsys, *args)
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert needle in err, err
    assert snapshot(root) == before
    return err


@pytest.fixture(autouse=True)
def no_compile_cache(monkeypatch):
    monkeypatch.setenv("JMERGE_NO_COMPILE_CACHE", "1")  # leave the user's cache alone


@pytest.fixture
def models(tiny_model_dir, tmp_path):
    """Private copies of two tiny llamas in tmp/models, and a linear merge config of them."""
    d = tmp_path / "models"
    for name, seed in (("a", 0), ("b", 1)):
        shutil.copytree(tiny_model_dir("llama", seed), d / name)
    cfg = tmp_path / "cfg.yml"
    cfg.write_text(LINEAR.format(a=d / "a", b=d / "b"))
    return d, cfg


# ---------------------------------------------------------------------------- overlap with inputs

def test_merge_force_into_the_folder_holding_its_models(capsys, models, tmp_path):
    d, cfg = models
    refused(capsys, tmp_path, "contains the input", "merge", "--force", "-q", cfg, d)


def test_merge_force_onto_its_config(capsys, models, tmp_path):
    _, cfg = models
    refused(capsys, tmp_path, "is the input", "merge", "--force", "-q", cfg, cfg)


def test_convert_force_onto_its_source(capsys, model, tmp_path):
    refused(capsys, tmp_path, "is the input", "convert", "--force", "--dtype", "float16", "-q", model, model)


def test_convert_into_its_source(capsys, model, tmp_path):
    refused(capsys, tmp_path, "lies inside the input", "convert", "-q", model, model / "converted")


def test_convert_onto_a_symlink_to_its_source(capsys, model, tmp_path):
    (tmp_path / "link").symlink_to(model)
    refused(capsys, tmp_path, "is the input", "convert", "--force", "-q", model, tmp_path / "link")


@pytest.mark.parametrize("out, needle", [(".", "is the current directory"),
                                         ("..", "contains the current directory")])
def test_output_that_is_or_holds_the_working_directory(capsys, model, tmp_path, monkeypatch, out, needle):
    cwd = tmp_path / "work" / "here"
    cwd.mkdir(parents=True)
    (cwd / "notes.txt").write_text("mine")
    monkeypatch.chdir(cwd)
    refused(capsys, tmp_path, needle, "convert", "--force", "-q", model, out)


def test_eval_report_onto_the_evaluated_model(capsys, model, tmp_path):
    refused(capsys, tmp_path, "is the input", "eval", "--models", model, "--out", model, "--force")


@pytest.mark.parametrize("where, needle", [
    ("input", "is the input"), ("out", "is the output"), ("inside-out", "lies inside the output"),
    ("holding-out", "contains the output")])
def test_merge_orbax_clashes(capsys, models, tmp_path, where, needle):
    d, cfg = models
    out = tmp_path / "out"
    if where == "holding-out":
        (tmp_path / "o").mkdir()
        out = tmp_path / "o" / "out"
    orbax = {"input": d / "a", "out": out, "inside-out": out / "orbax", "holding-out": tmp_path / "o"}[where]
    refused(capsys, tmp_path, needle, "merge", "--force", "-q", cfg, out, "--orbax", orbax)


# ---------------------------------------------------------------------------- JSONL outputs

@pytest.fixture
def no_model_load(monkeypatch):
    """Loading weights fails the test: refusals must come before any heavy work."""
    import jmerge.io

    def load_model(*a, **kw):
        raise AssertionError("weights were loaded before the output was checked")
    monkeypatch.setattr(jmerge.io, "load_model", load_model)


@pytest.mark.parametrize("case, needle", [
    ("exists", "already exists"), ("prompts", "is the input"), ("no-parent", "does not exist"),
    ("directory", "is a directory")])
def test_generate_out_checked_up_front(capsys, model, tmp_path, no_model_load, case, needle):
    prompts = tmp_path / "p.txt"
    prompts.write_text("hi\nthere\n")
    (tmp_path / "old.jsonl").write_text('{"id": "kept"}\n')
    (tmp_path / "dir").mkdir()
    out, force = {"exists": (tmp_path / "old.jsonl", []), "prompts": (prompts, ["--force"]),
                  "no-parent": (tmp_path / "missing" / "o.jsonl", []),
                  "directory": (tmp_path / "dir", ["--force"])}[case]
    refused(capsys, tmp_path, needle, "generate", "--model", model, "--prompts", prompts, "--out", out, *force)


@pytest.mark.parametrize("case, needle", [
    ("exists", "already exists"), ("prompts", "is the input"), ("no-parent", "does not exist")])
def test_synth_out_checked_up_front(capsys, model, tmp_path, no_model_load, case, needle):
    prompts = tmp_path / "benign.txt"
    prompts.write_text("how do I bake bread\nwhat is a bank\n")
    (tmp_path / "old.jsonl").write_text('{"id": "kept"}\n')
    out, force = {"exists": (tmp_path / "old.jsonl", []), "prompts": (prompts, ["--force"]),
                  "no-parent": (tmp_path / "missing" / "o.jsonl", [])}[case]
    refused(capsys, tmp_path, needle, "data", "synth", "--benign-prompts", prompts, "--model", model,
            "--out", out, *force)


def test_synth_force_replaces_in_one_rename(capsys, tmp_path):
    out = tmp_path / "d.jsonl"
    out.write_text("old\n")
    rc, err = cli(capsys, "data", "synth", "--finance", "3", "--split", "all", "--out", out, "--force")
    assert rc == 0, err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 6 and all(r["source"].startswith("finance") for r in rows)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"]  # no temporary left
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~_umask()


def test_generate_force_replaces_in_one_rename(capsys, tiny_tok_dir, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("hi\nthere\n")
    out = tmp_path / "o.jsonl"
    out.write_text("old\n")
    rc, err = cli(capsys, "generate", "--model", tiny_tok_dir["chat"], "--prompts", prompts, "--out", out,
                  "--max-new-tokens", "2", "--force")
    assert rc == 0, err
    assert [json.loads(line)["prompt"] for line in out.read_text().splitlines()] == ["hi", "there"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.jsonl", "p.txt"]  # no temporary left


def _umask() -> int:
    u = os.umask(0)
    os.umask(u)
    return u


# ---------------------------------------------------------------------------- output locations

@pytest.fixture
def read_only_dir(tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    immutable = False
    if os.geteuid() == 0:  # root writes through permission bits; an immutable dir stops it too
        immutable = subprocess.run(["chattr", "+i", str(d)], capture_output=True).returncode == 0
        if not immutable:
            d.chmod(0o755)
            pytest.skip("running as root without chattr: no read-only directory to test with")
    yield d
    if immutable:
        subprocess.run(["chattr", "-i", str(d)], check=True)
    d.chmod(0o755)


def test_read_only_location_refused_up_front(capsys, model, tmp_path, read_only_dir, no_model_load):
    refused(capsys, tmp_path, "cannot write the output there", "convert", "-q", model, read_only_dir / "out")


def test_search_out_must_not_overlap_its_inputs(capsys, model, tmp_path, no_model_load):
    import yaml
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "pairs.jsonl").write_text('{"prompt": "hi", "response": "hello"}\n')
    cfg = {"base": str(model), "experts": {"x": str(model)},
           "data": {"pairs": {"path": str(tmp_path / "data" / "pairs.jsonl"), "weight": 1.0}},
           "searches": {"coefficients": {"steps": 1, "batch_size": 1}}, "eval": {"suites": ["safety"]}}
    for out, needle in ((model / "search", "lies inside the input"), (tmp_path / "data", "contains the input")):
        f = tmp_path / "search.yaml"
        f.write_text(yaml.safe_dump(dict(cfg, out=str(out))))
        refused(capsys, tmp_path, needle, "search", "--config", f, "-q")


# ---------------------------------------------------------------------------- replacing an output

def _poison(d: Path) -> None:
    """A NaN in one weight of the model in d: merges refuse it while writing."""
    from safetensors.numpy import save_file

    from jmerge.io.safetensors_io import Checkpoint
    ck = Checkpoint(d)
    tensors = {n: np.array(ck.array(n)) for n in ck.names()}
    name = next(n for n in tensors if n.endswith("mlp.down_proj.weight"))
    tensors[name][0, 0] = np.nan
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})


def _old_output(out: Path) -> None:
    out.mkdir()
    (out / "config.json").write_text('{"old": true}')
    (out / "model.safetensors").write_bytes(b"old weights")


def test_failed_force_keeps_the_old_output(capsys, models, tmp_path):
    d, cfg = models
    _poison(d / "b")
    _old_output(tmp_path / "out")
    refused(capsys, tmp_path, "NaN/Inf", "merge", "--force", "--stream", "-q", cfg, tmp_path / "out")


def test_force_replaces_the_old_output_once_the_new_is_whole(capsys, model, tmp_path):
    out = tmp_path / "out"
    _old_output(out)
    before = snapshot(model)
    rc, err = cli(capsys, "convert", "--force", "-q", model, out)
    assert rc == 0, err
    assert json.loads((out / "config.json").read_text()).get("old") is None
    from jmerge.io.safetensors_io import Checkpoint
    new, src = Checkpoint(out), Checkpoint(model)
    assert sorted(new.names()) == sorted(src.names())
    assert all(np.array_equal(new.array(n), src.array(n)) for n in src.names())
    assert snapshot(model) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "out"]  # no .out.tmp / .out.old-*


@pytest.mark.parametrize("sig, rc, line", [(signal.SIGTERM, 143, "jmerge: terminated"),
                                           (signal.SIGINT, 130, "jmerge: interrupted")])
def test_signal_mid_merge_cleans_up(models, tmp_path, sig, rc, line):
    """A real `python -m jmerge.merge_cli`, signalled while its finished output waits in the
    temporary directory (held there by the test hook): the temporary goes, the old output stays."""
    from jmerge.io.atomic import HOLD_ENV
    d, cfg = models
    out = tmp_path / "out"
    _old_output(out)
    before = snapshot(tmp_path)
    env = dict(os.environ, **{HOLD_ENV: "120"}, JMERGE_NO_COMPILE_CACHE="1", JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    # The child starts as from a terminal: SIGINT neither ignored nor blocked. (It inherits both
    # from this process; twice in a full-suite run this session the SIGINT case sat out its 60 s,
    # never alone: what in the worker ignored or blocked SIGINT was not found.)
    parent = (signal.getsignal(signal.SIGINT), signal.pthread_sigmask(signal.SIG_BLOCK, []))

    def as_from_a_terminal():
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    p = subprocess.Popen([sys.executable, "-m", "jmerge.merge_cli", str(cfg), str(out), "--force", "-q", "--stream"],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=as_from_a_terminal)
    tmp = tmp_path / ".out.tmp"
    deadline = time.monotonic() + 240
    while not (tmp / "config.json").exists():
        assert p.poll() is None, p.communicate()
        assert time.monotonic() < deadline, "the merge never reached its temporary output"
        time.sleep(0.2)
    p.send_signal(sig)
    try:
        _, err = p.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        p.kill()
        _, err = p.communicate()
        raise AssertionError(f"no exit 60 s after {sig!r}; this process's SIGINT handler and blocked "
                             f"signals: {parent}; the child said: {err[-2000:]}") from None
    assert p.returncode == rc, (err, parent)
    assert err.strip().splitlines()[-1] == line and "Traceback" not in err, err
    assert snapshot(tmp_path) == before  # temporary gone, old output and inputs as they were


# ---------------------------------------------------------------------------- internal errors

def test_internal_error_is_one_line(capsys, monkeypatch, tmp_path):
    import jmerge.convert

    def broken(*a, **kw):
        raise RuntimeError("boom\n  at the second line")
    monkeypatch.setattr(jmerge.convert, "convert", broken)
    monkeypatch.delenv("JMERGE_DEBUG", raising=False)
    rc, err = cli(capsys, "convert", tmp_path / "a", tmp_path / "b")
    assert rc == 1
    assert err == ("jmerge: internal error: RuntimeError: boom at the second line "
                   "(set JMERGE_DEBUG=1 for the traceback)")
    monkeypatch.setenv("JMERGE_DEBUG", "1")
    with pytest.raises(RuntimeError, match="boom"):
        main(["convert", str(tmp_path / "a"), str(tmp_path / "b")])


def test_interrupt_still_exits_130(capsys, monkeypatch, tmp_path):
    import jmerge.convert

    def interrupted(*a, **kw):
        raise KeyboardInterrupt
    monkeypatch.setattr(jmerge.convert, "convert", interrupted)
    rc, err = cli(capsys, "convert", tmp_path / "a", tmp_path / "b")
    assert (rc, err) == (130, "jmerge: interrupted")
