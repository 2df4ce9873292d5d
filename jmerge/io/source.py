"""One way to open a model: a reference -> its kind, config, tensors and tokenizer, no weight read.

A reference is an HF directory (or safetensors file), a `.gguf` file, a jmerge orbax directory,
`BASE+ADAPTER` (mergekit's syntax for a PEFT LoRA adapter over a base), or an adapter directory
whose base is given or named by its config. Pickle checkpoints are refused. The kind is decided
here once; loading the weights (`jmerge.io.load_model`) and merging them
(`jmerge.engine.inputs`) start from the `Source` this returns.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
from pathlib import Path
from typing import Callable

from jmerge.config import ModelConfig, from_hf_dict, load_config
from jmerge.errors import JmergeError
from jmerge.io import hf, orbax_io, peft, split_adapter
from jmerge.io.gguf import GGUFSource, read_gguf
from jmerge.io.hf import TensorSource
from jmerge.io.safetensors_io import PICKLE_SUFFIXES, Checkpoint, pickle_message


class Use(enum.Enum):
    """What a model is opened for. The two accept different inputs and word some errors
    differently (a merge names the reference as its config wrote it)."""

    # convert, eval, generate, search: every kind; an adapter directory finds its base (given, or
    # the local one its config names); tokenizer files and a GGUF chat template are checked here.
    LOAD = "load"
    # A merge input: headers only, no orbax (its tensors are not readable one by one), an adapter
    # only as BASE+ADAPTER; tokenizers are checked by the merge against the other models'.
    MERGE = "merge"


@dataclasses.dataclass(frozen=True)
class Source:
    ref: str  # as given
    path: Path  # the model directory or file (the base when ref is BASE+ADAPTER)
    kind: str  # "hf", "gguf" or "orbax"
    cfg: ModelConfig
    tensors: TensorSource | None  # None for orbax: orbax restores its own checkpoints
    tokenizer_dir: Path | None  # None for GGUF: its tokenizer lives in the metadata
    # Writes the tokenizer files (and chat template) into an output directory.
    write_tokenizer: Callable[[Path], None]


def locate(ref: str, config_dir: Path) -> str:
    """A model reference as a path: relative to the working directory, else to the config."""
    parts = ref.split("+")
    out = []
    for p in parts:
        q = Path(p).expanduser()
        if not q.exists() and not q.is_absolute() and (config_dir / q).exists():
            q = config_dir / q
        out.append(str(q))
    return "+".join(out)


def open_source(ref: str | Path, *, base: str | Path | None = None, config_dir: Path | None = None,
                use: Use = Use.LOAD) -> Source:
    """Open `ref` for `use`, validating what is cheap (config, headers, tokenizer) before any
    weight is read. `base` is the base of an adapter directory (`--base`); `config_dir` is where
    references not found from the working directory are looked up (a merge config's folder)."""
    ref = str(ref)
    merge = use is Use.MERGE
    path_s, adapter = split_adapter(ref if config_dir is None else locate(ref, config_dir))
    path = Path(path_s)
    if not path.exists():
        raise JmergeError(f"{ref if merge else path}: no such file or directory")
    if adapter is None and peft.is_adapter_dir(path):
        path, adapter = _adapter_base(ref, path, base, merge), str(path)
    if path.is_file() and path.suffix in PICKLE_SUFFIXES:
        raise JmergeError(pickle_message(path))
    # The tokenizer files lie beside the weights, except GGUF's, which are in its metadata.
    tok_dir, write_tok = path, functools.partial(hf.copy_tokenizer, path)
    if path.suffix == ".gguf":
        g = read_gguf(path)
        if not merge:
            g.chat_template()  # the output's tokenizer carries it
        kind, cfg, tensors = "gguf", from_hf_dict(g.config, str(path)), GGUFSource(g)
        tok_dir, write_tok = None, g.save_tokenizer
    elif orbax_io.is_orbax_dir(path):
        if merge:
            raise JmergeError(f"{ref}: orbax directories cannot be merge inputs; export to HF first "
                              f"(jmerge convert {ref} OUT)")
        if adapter:
            raise JmergeError(f"{ref}: LoRA adapters apply to HF or GGUF bases, not orbax directories")
        hf.check_tokenizer(path)
        kind, cfg, tensors = "orbax", load_config(path), None
    else:
        kind, cfg, tensors = "hf", load_config(path), Checkpoint(path)
        if not merge and path.is_dir():
            hf.check_tokenizer(path)  # the output copies these files
    if adapter:
        if merge and not Path(adapter).exists():
            raise JmergeError(f"{ref}: adapter {adapter}: no such directory")
        tensors = peft.LoraSource(tensors, peft.LoraAdapter(adapter))
    return Source(ref, path, kind, cfg, tensors, tok_dir, write_tok)


def _adapter_base(ref: str, adapter: Path, base: str | Path | None, merge: bool) -> Path:
    """The base model of an adapter directory given alone: `base`, else the local directory its
    config names. A merge config must say which base it means (BASE+ADAPTER)."""
    if merge:
        named = peft.read_adapter_config(adapter).get("base_model_name_or_path")
        raise JmergeError(f"{ref}: a LoRA adapter needs its base: write BASE+{ref} (its config names {named!r})")
    if base:
        return Path(base)
    named = peft.read_adapter_config(adapter).get("base_model_name_or_path")
    if not named or not Path(named).exists():
        raise JmergeError(f"{adapter}: a LoRA adapter needs its base model: pass BASE+{adapter} "
                          f"(or --base BASE); its config names {named!r}, not a local directory")
    return Path(named)
