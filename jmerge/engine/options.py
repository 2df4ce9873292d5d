"""How to run a merge: everything besides the config and the output directory, in one value."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from jax.sharding import Mesh


@dataclasses.dataclass(frozen=True)
class MergeOptions:
    mode: str = "auto"  # "stream" | "memory" | "auto" (`run.choose_mode`)
    seed: int = 0  # for stochastic methods (DARE, DELLA)
    mesh: Mesh | None = None  # in-memory merges (default: one device)
    force: bool = False  # replace an existing output
    orbax: str | Path | None = None  # also write an orbax copy of the merged params here
    max_shard_size: str | int = "5GB"
    progress: bool = False
    lenient: bool = False  # parameter names no merge method knows are warnings, not errors
    allow_nonfinite: bool = False  # NaN/Inf in the inputs or the merged weights are written, with a warning
    # Where traced per-tensor programs are kept across runs (`programs.compile_exported`);
    # None traces every time.
    export_cache: Path | None = None
