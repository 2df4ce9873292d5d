"""Every malformed model, adapter, tokenizer or config file through every command that reads it:
one line on stderr naming the problem, exit code 2, no traceback, nothing written.

The cases come from tests/malformed.py (one generator, many corruptions); each runs in-process
against a private copy of one shared pristine tiny model. All of them fail while files are
parsed, before any weight is read or any program compiled, so the whole grid runs in seconds.
"""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest

import malformed
from jmerge.cli import main

CASES = list(malformed.cases())
GRID = [pytest.param(case, cmd, id=f"{case.id}-{cmd}") for case in CASES for cmd in case.commands]
# A FIFO that slipped through would block the read forever: fail the case instead.
HANG_S = 60


@pytest.fixture(scope="session")
def pristine(tiny_tok_dir, tmp_path_factory) -> Path:
    return malformed.make_pristine(tiny_tok_dir["chat"], tmp_path_factory.mktemp("malformed") / "pristine")


@pytest.fixture
def no_hang():
    def stuck(signum, frame):
        raise TimeoutError(f"command still running after {HANG_S} s (blocked on a special file?)")
    old = signal.signal(signal.SIGALRM, stuck)
    signal.alarm(HANG_S)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.fixture
def no_weight_reads(monkeypatch):
    """Every case must fail while files are parsed: reading a weight is a failure of the test."""
    from jmerge.io.gguf import GGUFModel
    from jmerge.io.safetensors_io import SafetensorsFile

    def read(*a, **k):
        raise AssertionError("a weight was read before the bad input was reported")
    for cls, name in ((SafetensorsFile, "array"), (SafetensorsFile, "read_into"), (GGUFModel, "tensor")):
        monkeypatch.setattr(cls, name, read)


def command_line(cmd: str, ref: str, pristine: Path, work: Path) -> list[str]:
    """The arguments that make `cmd` read model `ref`; outputs would go into `work`."""
    if cmd == "convert":
        return ["convert", ref, str(work / "out"), "-q"]
    if cmd == "generate":
        (work / "prompts.txt").write_text("hello there\n")
        return ["generate", "--model", ref, "--prompts", str(work / "prompts.txt"), "--max-new-tokens", "2",
                "--out", str(work / "out.jsonl")]
    plan = work / "merge.yml"
    plan.write_text(json.dumps({"merge_method": "task_arithmetic", "base_model": str(pristine),
                                "models": [{"model": ref, "parameters": {"weight": 1.0}}]}))
    if cmd == "check":
        return ["check", str(plan)]
    assert cmd == "inspect", cmd
    return ["inspect", str(plan), "--out", str(work / "report")]


def run(capsys, args: list[str]) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(args)
    return rc, capsys.readouterr().err


def expect_one_line(rc: int, err: str, needle: str) -> None:
    assert rc == 2, err
    assert "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("jmerge: error: "), err
    assert needle in err, err


def test_grid_is_large_and_ids_unique():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    assert len(CASES) >= 100 and len(GRID) >= 300


@pytest.mark.parametrize("case,cmd", GRID)
def test_malformed_input(case, cmd, pristine, tmp_path, capsys, no_hang, no_weight_reads):
    model = tmp_path / "m"
    shutil.copytree(pristine, model)
    ref = str(case.mutate(model) or model)
    args = command_line(cmd, ref, pristine, tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    rc, err = run(capsys, args)
    expect_one_line(rc, err, case.expect)
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "an output (or its temporary) was written"


@pytest.mark.parametrize("cmd", malformed.ALL)
def test_pristine_passes(cmd, pristine, tmp_path, capsys):
    """The same command lines on the uncorrupted model succeed: a failing case is the corruption."""
    model = tmp_path / "m"
    shutil.copytree(pristine, model)
    rc, err = run(capsys, command_line(cmd, str(model), pristine, tmp_path))
    assert rc == 0, err


def test_pristine_adapter_passes(pristine, tmp_path, capsys):
    model = tmp_path / "m"
    shutil.copytree(pristine, model)
    ref = malformed.adapter()(model)
    rc, err = run(capsys, command_line("check", ref, pristine, tmp_path))
    assert rc == 0, err


def test_prompt_longer_than_context(pristine, tmp_path, capsys):
    """Refused with a line before any generation program is built (it would size the attention
    mask and KV cache by the prompt's length)."""
    model = tmp_path / "m"
    shutil.copytree(pristine, model)
    malformed.edit_json("config.json", malformed.set_key("max_position_embeddings", 8))(model)
    args = command_line("generate", str(model), pristine, tmp_path)
    (tmp_path / "prompts.txt").write_text("a prompt of many more than eight characters\n")
    rc, err = run(capsys, ["generate", *args[1:], "--no-chat-template"])
    last = err.strip().splitlines()[-1]
    assert rc == 2 and "Traceback" not in err, err
    assert "longer than the model's context of 8 tokens" in last, err
    assert not (tmp_path / "out.jsonl").exists()


def test_chat_template_file_syntax_error(pristine, tmp_path, capsys):
    bad = tmp_path / "t.jinja"
    bad.write_text("{% if add_generation_prompt %}<|assistant|>")
    args = command_line("generate", str(pristine), pristine, tmp_path)
    rc, err = run(capsys, [*args, "--chat-template", str(bad)])
    expect_one_line(rc, err, "Jinja syntax error")


def test_index_shards_may_be_symlinks_into_a_blob_store(pristine, tmp_path, capsys):
    """The Hugging Face cache layout: shard names inside the folder, files linked from ../blobs.
    Only the index's names must stay inside the folder, not what the user's links point at."""
    model = tmp_path / "snapshot"
    shutil.copytree(pristine, model)
    malformed.shard(model)
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    for f in model.glob("model-*.safetensors"):
        f.rename(blobs / f.name)
        f.symlink_to(Path("..") / "blobs" / f.name)
    rc, err = run(capsys, ["convert", str(model), str(tmp_path / "out"), "-q"])
    assert rc == 0, err
    assert (tmp_path / "out" / "model.safetensors").exists()


@pytest.fixture(scope="module")
def orbax_model(pristine, tmp_path_factory):
    out = tmp_path_factory.mktemp("orbax") / "m"
    assert main(["convert", str(pristine), str(out), "--to", "orbax", "-q"]) == 0
    return out


@pytest.mark.parametrize("name,mutate,needle", [
    ("metadata-list", malformed.write_raw("params/state/_METADATA", "[]"), "unreadable orbax checkpoint"),
    ("metadata-garbage", malformed.write_raw("params/state/_METADATA", b"\xff\xfe"), "unreadable orbax checkpoint"),
    ("config-disagrees", malformed.edit_json("config.json", malformed.set_key("intermediate_size", 50)),
     "params/ does not match config.json"),
    ("config-zero-heads", malformed.edit_json("config.json", malformed.set_key("num_attention_heads", 0)),
     "num_attention_heads must be"),
    ("tokenizer-broken", malformed.write_raw("tokenizer.json", '{"model": 5}'), "not a tokenizer"),
])
def test_malformed_orbax_dir(name, mutate, needle, orbax_model, tmp_path, capsys):
    model = tmp_path / "m"
    shutil.copytree(orbax_model, model)
    mutate(model)
    rc, err = run(capsys, ["convert", str(model), str(tmp_path / "out"), "-q"])
    expect_one_line(rc, err, needle)
    assert not (tmp_path / "out").exists()


def test_orbax_pristine_converts(orbax_model, tmp_path, capsys):
    rc, err = run(capsys, ["convert", str(orbax_model), str(tmp_path / "out"), "-q"])
    assert rc == 0, err
