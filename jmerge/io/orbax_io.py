"""Orbax (v1 API) checkpoints of the params pytree, restorable onto any mesh shape.

An orbax model directory holds `config.json`, the tokenizer files, and `params/` (orbax). The
restore target is abstract (shape, dtype, NamedSharding on the new mesh), so a checkpoint written
on one mesh loads onto another without a host copy of the model.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import sys
from pathlib import Path

import jax
from jax.sharding import Mesh

from jmerge import sharding as shd
from jmerge.config import ModelConfig, load_config
from jmerge.errors import JmergeError, collect, first_line
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
    params = Path(path) / "params"
    if not params.is_dir():
        return False
    try:
        return bool(_ocp().is_orbax_checkpoint(params))
    except Exception:  # a damaged layout: not recognisably orbax; the other readers report it
        return False


def save_orbax(params, cfg: ModelConfig, out: str | Path, *, extra_from=None, force=False,
               tokenizer_writer=None) -> Path:
    with atomic_dir(out, force, inputs=(extra_from,)) as tmp:
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
    with _orbax_errors(path / "params"):
        meta = _metadata(path / "params").metadata
    _check_layout(meta, cfg, path)
    shardings = shd.param_shardings(meta, mesh)
    target = jax.tree.map(lambda m, s: jax.ShapeDtypeStruct(m.shape, dtype or m.dtype, sharding=s),
                          meta, shardings)
    with _orbax_errors(path / "params"):
        return cfg, _load(path / "params", target)


@contextlib.contextmanager
def quiet_reads():
    """A failed orbax read is reported as one line by the caller; meanwhile orbax logs it and its
    abandoned reads print "Exception ignored" tracebacks when collected, so both are silenced for
    the duration (the collection included)."""
    log, hook = logging.getLogger("absl"), sys.unraisablehook
    level = log.level
    log.setLevel(logging.CRITICAL)
    sys.unraisablehook = lambda unraisable: None
    try:
        yield
    finally:
        gc.collect()
        sys.unraisablehook = hook
        log.setLevel(level)


@contextlib.contextmanager
def _orbax_errors(where: Path):
    """orbax and tensorstore errors (of any type) as one line naming the checkpoint; orbax's own
    reports of the damage are kept off the terminal, the line says it."""
    with quiet_reads():
        try:
            yield
        except JmergeError:
            raise
        except Exception as e:
            first = first_line(e, 300)
            raise JmergeError(f"{where}: unreadable orbax checkpoint ({type(e).__name__}: {first})") from None


def _check_layout(meta, cfg: ModelConfig, path: Path) -> None:
    """The stored tree against the one config.json implies: every missing, extra or mis-shaped
    leaf at once, before anything is restored."""
    from jmerge.io.hf import leaf_paths
    if meta is None:  # orbax's answer when it cannot read its own metadata
        raise JmergeError(f"{path / 'params'}: unreadable orbax checkpoint (its metadata is damaged or missing)")
    if not isinstance(meta, dict):
        raise JmergeError(f"{path / 'params'}: orbax checkpoint holds a {type(meta).__name__}, not a params tree")
    want = {"/".join(k): tuple(a.shape) for k, a in leaf_paths(cfg).items()}
    have = {}
    for p, m in jax.tree_util.tree_flatten_with_path(meta)[0]:
        have["/".join(str(getattr(k, "key", k)) for k in p)] = tuple(getattr(m, "shape", ()) or ())
    problems = [f"missing {k}" for k in want if k not in have]
    problems += [f"unexpected {k}" for k in have if k not in want]
    problems += [f"{k} has shape {list(have[k])}, config implies {list(s)}" for k, s in want.items()
                 if k in have and have[k] != s]
    collect(problems, f"{path}: params/ does not match config.json ({cfg.family})")
