"""Model I/O: any supported source -> (config, params pytree on a mesh) and back out.

Sources: an HF directory (safetensors, single or sharded), a `.gguf` file, a jmerge orbax
directory, a PEFT LoRA adapter over a base (`base+adapter`, mergekit's syntax, or an adapter dir
whose config names a local base). Pickle checkpoints are refused.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import numpy as np
from jax.sharding import Mesh

from jmerge.config import ModelConfig, from_hf_dict, load_config
from jmerge.errors import JmergeError


@dataclasses.dataclass
class Loaded:
    cfg: ModelConfig
    params: dict
    source: str
    # Writes tokenizer files (and chat template) into an output directory.
    write_tokenizer: Callable[[Path], None]


class GGUFSource:
    """Dequantized GGUF tensors, a few kept so per-shard callbacks don't dequantize twice."""

    def __init__(self, model, keep_bytes: int = 1 << 30):
        self.model, self.keep, self.cache = model, keep_bytes, OrderedDict()
        self._names = list(model.tensor_names())

    def names(self):
        return self._names

    def shape(self, name):
        return tuple(self.model.shape(name))

    def dtype(self, name):
        return self.array(name).dtype

    def array(self, name) -> np.ndarray:
        if name not in self.cache:
            self.cache[name] = self.model.tensor(name)
            while sum(a.nbytes for a in self.cache.values()) > self.keep and len(self.cache) > 1:
                self.cache.popitem(last=False)
        self.cache.move_to_end(name)
        return self.cache[name]


def split_adapter(src: str) -> tuple[str, str | None]:
    """'BASE+ADAPTER' -> (BASE, ADAPTER); anything else -> (src, None)."""
    if "+" in src and not Path(src).exists():
        base, adapter = src.rsplit("+", 1)
        return base, adapter
    return src, None


def load_model(src: str | Path, *, mesh: Mesh | None = None, dtype=None, allow_nonfinite=False,
               progress=False, base: str | Path | None = None) -> Loaded:
    from jmerge.io import hf, orbax_io, peft
    from jmerge.io.safetensors_io import PICKLE_SUFFIXES, Checkpoint, pickle_message

    src = str(src)
    path_s, adapter = split_adapter(src)
    path = Path(path_s)
    if not path.exists():
        raise JmergeError(f"{path}: no such file or directory")
    if adapter is None and peft.is_adapter_dir(path):
        adapter, path = str(path), Path(base) if base else None
        if path is None:
            named = peft.read_adapter_config(adapter).get("base_model_name_or_path")
            if not named or not Path(named).exists():
                raise JmergeError(f"{adapter}: a LoRA adapter needs its base model: pass BASE+{adapter} "
                                  f"(or --base BASE); its config names {named!r}, not a local directory")
            path = Path(named)
    if path.is_file() and path.suffix in PICKLE_SUFFIXES:
        raise JmergeError(pickle_message(path))
    if path.suffix == ".gguf":
        from jmerge.io.gguf import read_gguf
        g = read_gguf(path)
        g.chat_template()  # checked before the weights are read: the output's tokenizer carries it
        cfg, source, write_tok = from_hf_dict(g.config, str(path)), GGUFSource(g), g.save_tokenizer
    elif orbax_io.is_orbax_dir(path):
        if adapter:
            raise JmergeError(f"{src}: LoRA adapters apply to HF or GGUF bases, not orbax directories")
        hf.check_tokenizer(path)
        cfg, params = orbax_io.load_orbax(path, mesh, dtype)
        if not allow_nonfinite:
            hf.check_finite(params, cfg, str(path))
        return Loaded(cfg, params, src, lambda out: hf.copy_tokenizer(path, out))
    else:
        cfg, source = load_config(path), Checkpoint(path)
        if path.is_dir():
            hf.check_tokenizer(path)  # before any weight is read: the output copies these files
        write_tok = lambda out: hf.copy_tokenizer(path, out)  # noqa: E731
    if adapter:
        source = peft.LoraSource(source, peft.LoraAdapter(adapter))
    params = hf.load_params(source, cfg, mesh, dtype, allow_nonfinite, str(path), progress)
    return Loaded(cfg, params, src, write_tok)
