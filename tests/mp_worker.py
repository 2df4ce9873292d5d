"""One process of the two-process test: load a checkpoint sharded across both, run the forward."""

import sys

import jax
import numpy as np

from jmerge import distributed, sharding
from jmerge.io import load_model
from jmerge.models import llama

model_dir, port, pid, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
distributed.start({"coordinator": f"127.0.0.1:{port}", "num_processes": 2, "process_id": pid})
assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4
m = load_model(model_dir, mesh=sharding.make_mesh("fsdp=4,tensor=2"))
q = m.params["model"]["layers"]["self_attn"]["q_proj"]["weight"]
assert not q.is_fully_addressable  # each process holds only its own shards
ids = np.load(out + ".ids.npy")
mask = np.load(out + ".mask.npy")
logits = jax.jit(lambda p, i, a: llama.forward(p, m.cfg, i, a), out_shardings=sharding.replicated(q.sharding.mesh))(m.params, ids, mask)
if pid == 0:
    np.save(out, np.asarray(logits.addressable_data(0)))
