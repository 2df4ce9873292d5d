"""Outputs appear whole or not at all: written to a temporary sibling, renamed into place."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from jmerge.errors import JmergeError


def check_target(out: str | Path, force: bool = False) -> Path:
    out = Path(out)
    if out.exists() and not force:
        raise JmergeError(f"{out}: already exists (pass --force to replace it)")
    if not out.parent.exists():
        raise JmergeError(f"{out.parent}: output's parent directory does not exist")
    return out


@contextlib.contextmanager
def atomic_dir(out: str | Path, force: bool = False):
    """Yield a temporary directory beside `out`; on success it replaces `out` in one rename."""
    out = check_target(out, force)
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno == 28:
            raise JmergeError(f"{out}: disk full while writing; nothing was written") from None
        raise
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
