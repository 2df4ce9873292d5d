"""A 4-step coefficient search on the fsdp=4,tensor=2 mesh that checkpoints every 2 steps, run
fresh or resumed from a checkpoint directory: as one of two processes (4 devices each) by
tests/test_restore_shapes.py, or imported and called in the test's own 8-device process."""

import json
import shutil
import sys
from pathlib import Path

import numpy as np

from mp_search_worker import MESH, examples
from jmerge import sharding
from jmerge.io import load_model
from jmerge.sharding import host_value
from jmerge.search.gradient import GradientSearch, SearchSpec
from jmerge.search.parametrisations import Coefficients

STEPS, EVERY = 4, 2


def search(model_dirs: list[str], ckpt_dir: str) -> dict:
    """λ after the run (resuming from `ckpt_dir`'s checkpoint when it holds one) and the losses
    of the steps this run made."""
    mesh = sharding.make_mesh(MESH)
    base, *experts = [load_model(d, mesh=mesh) for d in model_dirs]
    vocab, layers = base.cfg.vocab_size, base.cfg.num_layers
    typed = {"a": (examples(vocab, 8, 0), 1.0), "b": (examples(vocab, 8, 1), 0.5)}
    param = Coefficients(k=len(experts), transform="clamp", init=0.5)
    spec = SearchSpec(steps=STEPS, lr=0.05, batch_size=4, checkpoint_every=EVERY)
    log = []
    s = GradientSearch(base.cfg, base.params, [e.params for e in experts], param, spec, param.theta0(layers))
    s.fit(typed, ckpt_dir=ckpt_dir, progress=False, log=log)
    return {"layers": host_value(s.theta["layers"]), "rest": host_value(s.theta["rest"]),
            "loss": np.array([r["loss"] for r in log])}


def crashed_copy(ckpt_dir: str | Path, dest: str | Path) -> Path:
    """`ckpt_dir` as a run that died after its step-2 checkpoint: the step pointer at 2 and the
    step-4 state gone."""
    dest = Path(dest)
    shutil.copytree(ckpt_dir, dest)
    meta = json.loads((dest / "meta.json").read_text())
    (dest / "meta.json").write_text(json.dumps(dict(meta, step=EVERY)))
    shutil.rmtree(dest / f"step_{STEPS:08d}")
    return dest


if __name__ == "__main__":
    from mp_search_worker import pair_main
    pair_main(search)
