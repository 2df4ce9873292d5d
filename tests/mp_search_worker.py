"""A few coefficient-search steps with the params sharded over 8 devices: run as one of two
processes (4 devices each) by tests/test_multiprocess.py, or imported and called in the test's own
8-device process for the single-process reference."""

import sys

import numpy as np

from jmerge import data, sharding
from jmerge.io import load_model
from jmerge.sharding import host_value
from jmerge.search.gradient import GradientSearch, SearchSpec
from jmerge.search.parametrisations import Coefficients

MESH = "fsdp=4,tensor=2"


def examples(vocab: int, n: int, seed: int) -> list[data.Example]:
    """Random token rows of mixed lengths (so batches are padded), the first 4 tokens a prompt."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = rng.integers(1, vocab, int(rng.integers(8, 15))).astype(np.int32)
        out.append(data.Example(ids, (np.arange(len(ids)) >= 4).astype(np.int32)))
    return out


def search(model_dirs: list[str], ckpt_dir: str) -> dict:
    """Learnt λ, the loss curve, and λ restored from the last checkpoint by a fresh search."""
    mesh = sharding.make_mesh(MESH)
    base, *experts = [load_model(d, mesh=mesh) for d in model_dirs]
    vocab, layers = base.cfg.vocab_size, base.cfg.num_layers
    typed = {"a": (examples(vocab, 8, 0), 1.0), "b": (examples(vocab, 8, 1), 0.5)}
    param = Coefficients(k=len(experts), transform="clamp", init=0.5)
    spec = SearchSpec(steps=4, lr=0.05, batch_size=4, checkpoint_every=2)

    def fresh():
        return GradientSearch(base.cfg, base.params, [e.params for e in experts], param, spec,
                              param.theta0(layers))
    log = []
    s = fresh().fit(typed, ckpt_dir=ckpt_dir, progress=False, log=log)
    again = fresh().fit(typed, ckpt_dir=ckpt_dir, progress=False)  # restores step 4: no step runs
    assert again.step == spec.steps
    return {"layers": host_value(s.theta["layers"]), "rest": host_value(s.theta["rest"]),
            "restored": host_value(again.theta["layers"]), "loss": np.array([r["loss"] for r in log])}


def pair_main(search_fn) -> None:
    """One process of a pair: argv is port, process id, output .npz, checkpoint dir, model dirs."""
    import jax

    from jmerge import distributed
    port, pid, out, ckpt, *dirs = sys.argv[1:]
    distributed.start({"coordinator": f"127.0.0.1:{port}", "num_processes": 2, "process_id": pid})
    assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4
    got = search_fn(dirs, ckpt)
    if jax.process_index() == 0:
        np.savez(out, **got)


if __name__ == "__main__":
    pair_main(search)
