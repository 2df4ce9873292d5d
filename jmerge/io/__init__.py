"""Model I/O: any supported source -> (config, params pytree on a mesh) and back out.

Sources: an HF directory (safetensors, single or sharded), a `.gguf` file, a jmerge orbax
directory, a PEFT LoRA adapter over a base (`base+adapter`, mergekit's syntax, or an adapter dir
whose config names a local base). Pickle checkpoints are refused. `jmerge.io.source.open_source`
tells them apart; `load_model` reads the weights.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

from jax.sharding import Mesh

from jmerge.config import ModelConfig


@dataclasses.dataclass
class Loaded:
    cfg: ModelConfig
    params: dict
    source: str
    # Writes tokenizer files (and chat template) into an output directory.
    write_tokenizer: Callable[[Path], None]


def split_adapter(src: str) -> tuple[str, str | None]:
    """'BASE+ADAPTER' -> (BASE, ADAPTER); anything else -> (src, None)."""
    if "+" in src and not Path(src).exists():
        base, adapter = src.rsplit("+", 1)
        return base, adapter
    return src, None


def load_model(src: str | Path, *, mesh: Mesh | None = None, dtype=None, allow_nonfinite=False,
               progress=False, base: str | Path | None = None) -> Loaded:
    from jmerge.io import hf, orbax_io
    from jmerge.io.source import open_source

    s = open_source(src, base=base)
    where = str(s.path)
    if s.kind == "orbax":  # orbax restores its own checkpoints, straight onto the mesh
        _, params = orbax_io.load_orbax(s.path, mesh, dtype)
        if not allow_nonfinite:
            hf.check_finite(params, s.cfg, where)
    else:
        params = hf.load_params(s.tensors, s.cfg, mesh, dtype, allow_nonfinite, where, progress)
    return Loaded(s.cfg, params, s.ref, s.write_tokenizer)
