"""Two local processes x 4 CPU devices load one checkpoint sharded across both (CPU collectives)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

from conftest import padded_batch
from jmerge.io import load_model
from jmerge.models import llama


def test_two_processes_match_single_process(tiny_model_dir, tmp_path):
    path = tiny_model_dir("llama")
    ids, mask, _ = padded_batch(97, [6, 3])
    out = str(tmp_path / "logits.npy")
    np.save(out + ".ids.npy", ids)
    np.save(out + ".mask.npy", mask)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    worker = Path(__file__).with_name("mp_worker.py")
    procs = [subprocess.Popen([sys.executable, str(worker), str(path), str(port), str(i), out], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(x[-2000:] for x in logs)
    m = load_model(path)
    want = np.asarray(jax.jit(lambda p, i, a: llama.forward(p, m.cfg, i, a))(m.params, ids, mask))
    np.testing.assert_allclose(np.load(out), want, atol=2e-5)
