"""Outputs appear whole or not at all, and never at an input's expense.

Every output is written to a temporary sibling and renamed into place. An output that would
replace or swallow something the command reads (an input, the folder holding the inputs, the
working directory) is refused before any work, `--force` or not: `--force` only replaces an
earlier output, and the old output is deleted only once the new one is in place.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

from jmerge import distributed
from jmerge.errors import JmergeError

# Seconds to wait with a finished temporary output, before its rename: a window in which tests
# send signals to a real run.
HOLD_ENV = "JMERGE_TEST_HOLD_TMP"
# The process index that kills itself (SIGKILL) as its hold begins: a peer's death at a known
# point, where a test's own kill could land late on a loaded machine (after every barrier).
DIE_ENV = "JMERGE_TEST_DIE_IN_HOLD"


def _forms(p: str | Path) -> set[Path]:
    """The path as written (made absolute) and with its symlinks resolved: a symlink to an input
    is that input, and a symlink inside the output still goes away with it."""
    p = os.path.expanduser(str(p))
    return {Path(os.path.abspath(p)), Path(os.path.realpath(p))}


def _input_paths(inputs) -> list[str]:
    """The existing paths among `inputs` (None and built-in source names drop out); BASE+ADAPTER
    counts as both parts."""
    paths = []
    for x in inputs:
        if x is None:
            continue
        s = os.path.expanduser(str(x))
        parts = [s] if os.path.lexists(s) or "+" not in s else s.split("+")
        paths += [q for q in parts if q and os.path.lexists(q)]
    return paths


def model_inputs(ref: str | Path | None, base: str | Path | None = None) -> list:
    """The paths loading model `ref` reads: BASE+ADAPTER's parts, and for an adapter directory
    the base it is given or the one its config names."""
    if ref is None:
        return []
    from jmerge.io import peft
    named = None
    if base is None and peft.is_adapter_dir(ref):
        named = peft.LoraAdapter(ref).config.get("base_model_name_or_path")
    return [ref, base, named if isinstance(named, str) else None]


def _relation(out: Path, other: Path) -> str | None:
    if out == other:
        return "is"
    if other in out.parents:
        return "lies inside"
    if out in other.parents:
        return "contains"
    return None


def check_overlap(out: str | Path, inputs=(), outputs=(), data_dirs=()) -> None:
    """Refuse an output that is, contains or lies inside one of `inputs` (or of the command's
    other `outputs`, existing yet or not), or is or contains the working directory: replacing it
    would destroy what the command reads or has just written. `data_dirs` are folders the command
    looks its data files up in (--data): the output may lie inside one, not be or hold it."""
    outs = _forms(out)
    named = ([("input", q, True) for q in _input_paths(inputs)] + [("output", q, True) for q in outputs]
             + [("data directory", q, False) for q in _input_paths(data_dirs)])
    for kind, q, nested in named:
        for o in outs:
            for i in _forms(q):
                rel = _relation(o, i)
                if rel and (nested or rel != "lies inside"):
                    raise JmergeError(f"{out}: refusing to write there: it {rel} the {kind} {q} "
                                      f"(--force does not override this; choose another path)")
    try:
        cwd = _forms(os.getcwd())
    except OSError:  # the working directory was deleted: nothing there to lose
        cwd = set()
    for o in outs:
        for c in cwd:
            if o == c or o in c.parents:
                what = "is" if o == c else "contains"
                raise JmergeError(f"{out}: refusing to write there: it {what} the current directory "
                                  f"(--force does not override this; choose another path)")


def check_writable(d: str | Path) -> None:
    """Write (and remove) a small file in directory `d`: a read-only or full location is found
    before the work, not after. Permission bits alone would miss read-only mounts (and root)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".jmerge-probe-", dir=d)
    except OSError as e:
        raise _write_error(d, e) from None
    try:
        os.write(fd, b"\0" * 4096)
    except OSError as e:
        raise _write_error(d, e) from None
    finally:
        os.close(fd)
        os.unlink(probe)


def _write_error(d, e: OSError) -> JmergeError:
    if e.errno == errno.ENOSPC:
        return JmergeError(f"{d}: no space left on the device; nothing was written")
    return JmergeError(f"{d}: cannot write the output there ({e.strerror})")


def check_target(out: str | Path, force: bool = False, inputs=(), kind: str = "directory",
                 outputs=(), data_dirs=()) -> Path:
    """`out` if a `kind` ("directory" or "file") output may be written there: it overlaps no
    input (see check_overlap), exists only with `force`, and its parent is an existing writable
    directory."""
    out = Path(out)
    check_overlap(out, inputs, outputs, data_dirs)
    if kind == "file" and out.is_dir():
        raise JmergeError(f"{out}: is a directory, expected an output file path")
    if os.path.lexists(out) and not force:
        raise JmergeError(f"{out}: already exists (pass --force to replace it)")
    parent = out.parent
    if not parent.exists():
        raise JmergeError(f"{parent}: output's parent directory does not exist")
    if not parent.is_dir():
        raise JmergeError(f"{parent}: output's parent is not a directory")
    check_writable(parent)
    return out


def check_workspace(out: str | Path, inputs=(), data_dirs=()) -> Path:
    """A working directory that is created if missing and kept between runs (the search's): it
    overlaps no input, and its nearest existing ancestor (or itself) is a writable directory."""
    out = Path(out)
    check_overlap(out, inputs, data_dirs=data_dirs)
    d = out
    while not d.exists() and d != d.parent:
        d = d.parent
    if not d.is_dir():
        raise JmergeError(f"{d}: is not a directory, so the output {out} cannot be made there")
    check_writable(d)
    return out


@contextlib.contextmanager
def _signals_deferred():
    """SIGINT/SIGTERM wait until the swap of old and new output is done, so neither is lost
    half-way; a signal that came meanwhile is delivered afterwards."""
    sigs = [s for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) is not None]
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    saved = {s: signal.signal(s, lambda n, _f: pending.append(n)) for s in sigs}
    try:
        yield
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
        for s in dict.fromkeys(pending):
            signal.raise_signal(s)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def _swap(tmp: Path, out: Path) -> None:
    """Rename tmp to out; an old out is moved aside first and deleted only once tmp is in place
    (put back if the rename fails)."""
    if not os.path.lexists(out):
        os.replace(tmp, out)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    _remove(old)
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    _remove(old)


def _hold_for_tests() -> None:
    secs = os.environ.get(HOLD_ENV)
    if secs:
        if os.environ.get(DIE_ENV) == str(distributed.index()):
            os.kill(os.getpid(), signal.SIGKILL)
        # Short sleeps: a signal the kernel gave to another of the process's threads (XLA runs
        # many) interrupts no sleep of the main thread, which sees it only when a sleep ends.
        end = time.monotonic() + float(secs)
        while time.monotonic() < end:
            time.sleep(0.1)


def _disk_full(e: BaseException, out: Path) -> None:
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        raise JmergeError(f"{out}: disk full while writing; nothing was written") from None


@contextlib.contextmanager
def atomic_dir(out: str | Path, force: bool = False, inputs=(), data_dirs=()):
    """Yield a temporary directory beside `out`; on success it replaces `out` in one rename. On
    any failure (an interrupt too) the temporary directory goes and an old `out` stays as it was.

    With several processes every one of them gets the directory (each may write its own files
    into it, on a filesystem they share), but only process 0 checks the target, creates, renames
    or removes anything, between barriers; a failure on any process fails all of them."""
    if distributed.count() > 1:
        with _collective_dir(out, force, inputs, data_dirs) as tmp:
            yield tmp
        return
    out = check_target(out, force, inputs, data_dirs=data_dirs)
    tmp = _tmp_dir(out)
    _remove(tmp)  # left by a run that was killed outright
    try:
        tmp.mkdir()
        yield tmp
        _hold_for_tests()
        with _signals_deferred():
            _swap(tmp, out)
    except BaseException as e:
        _remove(tmp)
        _disk_full(e, out)
        raise


def _tmp_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.tmp"


@contextlib.contextmanager
def _collective_dir(out, force, inputs, data_dirs):
    def create():
        target = check_target(out, force, inputs, data_dirs=data_dirs)
        _remove(_tmp_dir(target))  # left by a run that was killed outright
        _tmp_dir(target).mkdir()
        return target
    target = distributed.on_lead(f"{out} created", create) or Path(out)
    tmp = _tmp_dir(target)
    try:
        with _together(f"{out} written"):
            yield tmp
            _hold_for_tests()
        if distributed.is_lead():
            with _signals_deferred():
                _swap(tmp, target)
        distributed.barrier(f"{out} in place")
    except BaseException as e:
        if distributed.is_lead():
            _remove(tmp)
            _disk_full(e, target)
        raise


@contextlib.contextmanager
def _together(what: str):
    """The body's outcome shared with the other processes: a JmergeError on any of them is
    raised on all; an interrupt or a bug is told to them (they stop too) and goes on here at once."""
    error = None
    try:
        yield
    except JmergeError as e:
        error = e
    except BaseException as e:
        distributed.announce(what, JmergeError(f"stopped ({type(e).__name__})"))
        raise
    distributed.raise_any(what, error)


@contextlib.contextmanager
def atomic_file(path: str | Path, force: bool = False, inputs=(), data_dirs=(), encoding: str = "utf-8"):
    """Yield a text file open on a temporary sibling of `path`; on success it replaces `path` in
    one rename, on failure it is removed and an old `path` stays as it was. With several
    processes, process 0 writes the file and the others write into nothing."""
    if distributed.count() == 1:
        with _local_file(path, force, inputs, data_dirs, encoding) as f:
            yield f
        return
    distributed.on_lead(f"{path} checked",
                        lambda: check_target(path, force, inputs, kind="file", data_dirs=data_dirs))
    with (_local_file(path, True, (), (), encoding) if distributed.is_lead()
          else open(os.devnull, "w", encoding=encoding)) as f, _together(f"{path} written"):
        yield f
    distributed.barrier(f"{path} in place")


@contextlib.contextmanager
def _local_file(path, force, inputs, data_dirs, encoding):
    path = check_target(path, force, inputs, kind="file", data_dirs=data_dirs)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding=encoding) as f:
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(fd, 0o666 & ~umask)  # mkstemp's 0600, not what a plain open would give
            yield f
            f.flush()
            os.fsync(f.fileno())
        with _signals_deferred():
            os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        _disk_full(e, path)
        raise
