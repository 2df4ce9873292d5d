"""Orbax (v1 API) checkpoints of the params pytree, restorable onto any mesh shape.

An orbax model directory holds `config.json`, the tokenizer files, and `params/` (orbax). The
restore target is abstract (shape, dtype, NamedSharding on the new mesh), so a checkpoint written
on one mesh loads onto another without a host copy of the model.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
from jax.sharding import Mesh

from jmerge import sharding as shd
from jmerge.config import ModelConfig, load_config
from jmerge.errors import JmergeError
from jmerge.io.atomic import atomic_dir
from jmerge.io.hf import copy_tokenizer, write_config

@functools.lru_cache(maxsize=None)
def _ocp():
    """orbax's v1 API, imported on first use: importing it costs ~0.2 s, which every `jmerge`
    command that only reads safetensors (merge, eval) would otherwise pay at start-up."""
    try:  # the v1 API moved out of `experimental` in newer orbax releases
        import orbax.checkpoint.v1 as ocp
    except ImportError:
        import orbax.checkpoint.experimental.v1 as ocp
    return ocp


# orbax refuses relative paths (in a background thread, after the save has started), and a
# config's `out: out/demo` is relative: every path is made absolute here.
def _call(name: str, old_name: str, path, *args, **kw):
    """orbax's `name`, or `old_name` before 0.12.8 renamed save_pytree/load_pytree/
    pytree_metadata to save/load/metadata."""
    ocp = _ocp()
    return (getattr(ocp, name, None) or getattr(ocp, old_name))(Path(path).absolute(), *args, **kw)


def _save(path, tree):
    return _call("save", "save_pytree", path, tree)


def _load(path, *args, **kw):
    return _call("load", "load_pytree", path, *args, **kw)


def _metadata(path, *args, **kw):
    return _call("metadata", "pytree_metadata", path, *args, **kw)


def is_orbax_dir(path: str | Path) -> bool:
    return (Path(path) / "params").is_dir() and _ocp().is_orbax_checkpoint(Path(path) / "params")


def save_orbax(params, cfg: ModelConfig, out: str | Path, *, extra_from=None, force=False,
               tokenizer_writer=None) -> Path:
    with atomic_dir(out, force) as tmp:
        _save(tmp / "params", params)
        if jax.process_index() == 0:
            leaf = jax.tree.leaves(params)[0]
            write_config(tmp, cfg, leaf.dtype)
            if extra_from is not None:
                copy_tokenizer(extra_from, tmp)
            if tokenizer_writer is not None:
                tokenizer_writer(tmp)
    return Path(out)


def load_orbax(path: str | Path, mesh: Mesh | None = None, dtype=None) -> tuple[ModelConfig, dict]:
    path = Path(path)
    if not is_orbax_dir(path):
        raise JmergeError(f"{path}: not a jmerge orbax directory (config.json + params/)")
    cfg = load_config(path)
    mesh = mesh or shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1})
    meta = _metadata(path / "params").metadata
    shardings = shd.param_shardings(meta, mesh)
    target = jax.tree.map(lambda m, s: jax.ShapeDtypeStruct(m.shape, dtype or m.dtype, sharding=s),
                          meta, shardings)
    return cfg, _load(path / "params", target)
