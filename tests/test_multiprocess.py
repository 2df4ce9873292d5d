"""Two local processes x 4 CPU devices (gloo collectives): loading a checkpoint sharded across
both, and a gradient search on params sharded across both, each against one 8-device process."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np

from conftest import padded_batch
from jmerge.io import load_model
from jmerge.models import llama


def run_two(worker: str, argv, logdir: Path) -> None:
    """Both processes of `worker`, each with argv(port, process id); fails with their logs as
    soon as one fails (its peer would wait for it until the timeout)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    path = Path(__file__).with_name(worker)
    logs = [logdir / f"{worker}.{i}.log" for i in range(2)]
    with open(logs[0], "w") as out0, open(logs[1], "w") as out1:
        procs = [subprocess.Popen([sys.executable, str(path), *map(str, argv(port, i))], env=env,
                                  stdout=f, stderr=subprocess.STDOUT) for i, f in enumerate((out0, out1))]
        deadline = time.monotonic() + 300
        try:
            while time.monotonic() < deadline and any(p.poll() is None for p in procs) \
                    and not any(p.returncode for p in procs):
                time.sleep(0.2)
        finally:
            for p in procs:
                p.kill()
                p.wait()
    assert all(p.returncode == 0 for p in procs), "\n".join(f.read_text()[-3000:] for f in logs)


def test_two_processes_match_single_process(tiny_model_dir, tmp_path):
    path = tiny_model_dir("llama")
    ids, mask, _ = padded_batch(97, [6, 3])
    out = str(tmp_path / "logits.npy")
    np.save(out + ".ids.npy", ids)
    np.save(out + ".mask.npy", mask)
    run_two("mp_worker.py", lambda port, i: [path, port, i, out], tmp_path)
    m = load_model(path)
    want = np.asarray(jax.jit(lambda p, i, a: llama.forward(p, m.cfg, i, a))(m.params, ids, mask))
    np.testing.assert_allclose(np.load(out), want, atol=2e-5)


def test_two_process_search_matches_single_process(tiny_model_dir, tmp_path):
    """Same seed, data and 8-device mesh: λ and the loss curve agree to float32 rounding (the
    all-reduces run over gloo in one case and in-process in the other, which may sum in another
    order), and both runs checkpoint (collectively) and restore."""
    from mp_search_worker import search
    dirs = [tiny_model_dir("llama", s) for s in (0, 1, 2)]
    out = tmp_path / "two.npz"
    run_two("mp_search_worker.py", lambda port, i: [port, i, out, tmp_path / "ckpt-two", *dirs],
            tmp_path)
    two = np.load(out)
    one = search([str(d) for d in dirs], str(tmp_path / "ckpt-one"))
    assert len(one["loss"]) == 4 and one["loss"][-1] < one["loss"][0], one["loss"]
    for k in ("loss", "layers", "rest"):
        np.testing.assert_allclose(two[k], one[k], rtol=1e-6, atol=0, err_msg=k)
    np.testing.assert_array_equal(two["restored"], two["layers"])
    np.testing.assert_array_equal(one["restored"], one["layers"])
