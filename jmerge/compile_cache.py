"""XLA's persistent compilation cache, on for every command: a second run of the same programs
(same model shapes, mesh, batch and bucket) loads them from disk instead of compiling them.

The cache lives under the jmerge cache (`$JMERGE_CACHE` or `~/.cache/jmerge`) in `xla/`; XLA keys
each entry on the program, its shapes and shardings, the devices and the compile flags, so a
stale entry is never used. `JMERGE_NO_COMPILE_CACHE=1` turns it off.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from jmerge.default_model import cache_root

# Programs that compile faster than this are not worth a disk read and write each.
MIN_COMPILE_SECS = 0.2


def exported_dir() -> Path | None:
    """The directory for the merge engine's exported programs (None: the cache is off)."""
    return None if os.environ.get("JMERGE_NO_COMPILE_CACHE") else cache_root() / "exported"


def persistent_compile_cache() -> None:
    """Turn the cache on (every command, from `jmerge.cli.run`)."""
    if os.environ.get("JMERGE_NO_COMPILE_CACHE"):
        return
    settings = {"jax_compilation_cache_dir": str(cache_root() / "xla"),
                "jax_persistent_cache_min_compile_time_secs": MIN_COMPILE_SECS}
    if "jax" in sys.modules:
        import jax
        for name, value in settings.items():
            jax.config.update(name, value)
    else:  # jax reads these when it is imported: a command that never compiles never imports it
        for name, value in settings.items():
            os.environ[name.upper()] = str(value)
