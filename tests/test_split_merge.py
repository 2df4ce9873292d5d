"""How a streaming merge is split between processes (whole output files, dealt by bytes) and how
their non-finite findings combine into the one error a single process gives; no processes are
launched (the two-process runs are in tests/test_multiprocess.py)."""

import types

import numpy as np
import pytest

from jmerge.engine.finite import refuse_nonfinite
from jmerge.errors import JmergeError
from jmerge.io import hf


def _files(sizes):
    f32 = np.dtype(np.float32)
    return [(f"f{i}", [(f"t{i}", f32, (n // 4,))]) for i, n in enumerate(sizes)]


@pytest.mark.parametrize("n", [1, 2, 3, 8])
def test_deal_covers_every_file_once_and_balances_bytes(n):
    rng = np.random.default_rng(n)
    sizes = [int(x) * 4 for x in rng.integers(1, 1000, 23)]
    owners = hf.deal_shards(_files(sizes), n)
    assert owners == hf.deal_shards(_files(sizes), n)  # the same on every process
    assert len(owners) == len(sizes) and set(owners) <= set(range(n))
    load = [sum(s for s, k in zip(sizes, owners) if k == p) for p in range(n)]
    assert sum(load) == sum(sizes)
    assert max(load) - min(load) <= max(sizes)
    assert owners[int(np.argmax(sizes))] == 0  # process 0 never idles


def test_deal_of_a_real_layout():
    f32 = np.dtype(np.float32)
    items = [(f"model.layers.{i}.w", f32, (64, 64)) for i in range(10)]
    files = hf.shard_files(items, "40KB")
    assert [f for f, _ in files][:2] == ["model-00001-of-00005.safetensors", "model-00002-of-00005.safetensors"]
    assert hf.deal_shards(files, 2) == [0, 1, 0, 1, 0]
    assert hf.deal_shards(files, 8) == [0, 1, 2, 3, 4]
    assert hf.shard_files(items, "5GB")[0][0] == "model.safetensors"
    assert hf.deal_shards(hf.shard_files(items, "5GB"), 2) == [0]


def _verdict(found, allow=False):
    p = types.SimpleNamespace(allow_nonfinite=allow, warnings=[])
    try:
        refuse_nonfinite(p, found)
    except JmergeError as e:
        return str(e)
    return p.warnings


def test_findings_of_two_processes_give_one_process_error():
    # process 1 merged the first and last files, process 0 the middle one
    one = {"inputs": [[0, "a: embed"], [9, "a: head"], [9, "b: head"]], "outputs": [[9, "head"]]}
    zero = {"inputs": [[4, "b: mid"]], "outputs": []}
    said = _verdict([zero, one])
    assert said.endswith("nothing was written: a: embed has NaN/Inf values; b: mid has NaN/Inf "
                         "values; a: head has NaN/Inf values; b: head has NaN/Inf values"), said
    # an overflow ahead of every bad input is what one process stops at, named alone
    early = {"inputs": [[7, "a: late"]], "outputs": [[5, "x"], [8, "y"]]}
    assert _verdict([{"inputs": [], "outputs": [[6, "z"]]}, early]).startswith(
        "the merged x has NaN/Inf values (pass")
    # a bad input in the same tensor as the first overflow: the inputs are named
    assert "a: x" in _verdict([{"inputs": [[5, "a: x"]], "outputs": [[5, "x"]]}])
    assert _verdict([{"inputs": [], "outputs": []}] * 2) == []


def test_findings_allowed_are_warnings_in_hf_order():
    found = [{"inputs": [[3, "a: c"]], "outputs": [[3, "c"]]},
             {"inputs": [[1, "a: b"]], "outputs": [[1, "b"], [2, "bb"]]}]
    assert _verdict(found, allow=True) == [
        "input a: b (and 1 more) has NaN/Inf values (merged: --allow-nonfinite)",
        "the merged b (and 2 more) has NaN/Inf values (written: --allow-nonfinite)"]
