"""Multi-process runs: start-up, barriers, and agreement between the processes.

Every command calls `start()` first. On TPU pods (and SLURM / Open MPI clusters jax recognises)
jax finds its peers by itself; elsewhere the coordinator comes from JMERGE_COORDINATOR (host:port),
JMERGE_NUM_PROCESSES and JMERGE_PROCESS_ID, or the flags --coordinator / --num-processes /
--process-id. With one process and nothing set every function here is a no-op (or the local
answer) and jax is not even imported for it, so single-machine runs need nothing.

The processes meet through the coordination service's barriers and key-value store, each with a
timeout, so a dead or stuck peer ends the run with one line instead of hanging it. Every process
makes the same sequence of calls, which numbers them: the n-th barrier of one process is the n-th
of every other.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import socket
import sys
import threading
from pathlib import Path

from jmerge.errors import JmergeError, first_line

ENV = {"coordinator": "JMERGE_COORDINATOR", "num_processes": "JMERGE_NUM_PROCESSES",
       "process_id": "JMERGE_PROCESS_ID"}
FLAGS = {"--coordinator": "coordinator", "--num-processes": "num_processes", "--process-id": "process_id"}
# Seconds a process waits for its peers at a barrier: long enough for process 0 to write a 70B
# export while the others wait, short enough that a hung peer does not hold a pod for a day.
BARRIER_TIMEOUT_ENV, BARRIER_TIMEOUT = "JMERGE_BARRIER_TIMEOUT", 1800.0
INIT_TIMEOUT_ENV, INIT_TIMEOUT = "JMERGE_INIT_TIMEOUT", 300.0
_CLUSTER_ENV = ("TPU_WORKER_HOSTNAMES", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "MEGASCALE_COORDINATOR_ADDRESS")

_calls = itertools.count()
_peer_lost = False


class PeerLost(JmergeError):
    """A peer did not arrive in time: it died, hangs, or runs another command."""

    exit_code = 1


def take_flags(argv: list[str]) -> tuple[list[str], dict]:
    """argv without the start-up flags (every command takes them), and their values."""
    rest, given, it = [], {}, iter(argv)
    for a in it:
        name, eq, value = a.partition("=")
        if name in FLAGS:
            if not eq:
                value = next(it, None)
                if value is None or value.startswith("--"):
                    raise JmergeError(f"{name} needs a value")
            given[FLAGS[name]] = value
        else:
            rest.append(a)
    return rest, given


def _seconds(env: str, default: float) -> float:
    raw = os.environ.get(env)
    if not raw:
        return default
    try:
        t = float(raw)
    except ValueError:
        t = -1.0
    if not t > 0:
        raise JmergeError(f"{env}={raw!r}: expected a positive number of seconds")
    return t


def _settings(given: dict) -> tuple[str, int, int] | None:
    """(coordinator, count, id) from flags over the environment, checked; None when none is set."""
    raw = {k: given.get(k, os.environ.get(env) or None) for k, env in ENV.items()}
    if all(v is None for v in raw.values()):
        return None
    missing = [f"--{k.replace('_', '-')} / {ENV[k]}" for k, v in raw.items() if v is None]
    if missing:
        raise JmergeError(f"a multi-process start needs the coordinator, the process count and this "
                          f"process's id; missing: {', '.join(missing)}")
    coordinator = str(raw["coordinator"])
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise JmergeError(f"coordinator {coordinator!r}: expected host:port")
    nums = {}
    for k in ("num_processes", "process_id"):
        try:
            nums[k] = int(raw[k])
        except (TypeError, ValueError):
            raise JmergeError(f"{ENV[k]} / --{k.replace('_', '-')} {raw[k]!r}: expected an integer") from None
    n, pid = nums["num_processes"], nums["process_id"]
    if n < 1:
        raise JmergeError(f"process count {n}: must be at least 1")
    if not 0 <= pid < n:
        raise JmergeError(f"process id {pid} is out of range for {n} processes (ids are 0..{n - 1})")
    return coordinator, n, pid


def start(given: dict | None = None) -> None:
    """Join the other processes of this run (see the module docstring); idempotent."""
    settings = _settings(given or {})
    if settings is None and not any(k in os.environ for k in _CLUSTER_ENV):
        return
    import jax
    if _client() is not None:
        return
    init = _seconds(INIT_TIMEOUT_ENV, INIT_TIMEOUT)
    if settings is None:
        where = "the cluster jax detected"
        args = {}
    else:
        coordinator, n, pid = settings
        where = f"coordinator {coordinator} as process {pid} of {n}"
        args = dict(coordinator_address=coordinator, num_processes=n, process_id=pid)
        if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS") == "cpu":
            # CPU devices of different processes talk through gloo collectives.
            jax.config.update("jax_cpu_collectives_implementation", "gloo")

    def give_up(why: str) -> str:
        return (f"could not join {where} within {init:g} s ({why}); check the address, that every "
                f"process was launched once with its own id, and {INIT_TIMEOUT_ENV}")
    # jax aborts the process (a C++ fatal error with a stack trace) when registration times out,
    # so a watchdog says it first, in one line, a few seconds before jax would.
    watchdog = threading.Timer(init, lambda: _leave(2, give_up(_why_not_joined(settings))))
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(**args, initialization_timeout=int(init) + 30,
                                   shutdown_timeout_seconds=int(min(_barrier_timeout(), 60)))
    except Exception as e:  # noqa: BLE001  (jax raises RuntimeError or its own runtime errors)
        raise JmergeError(give_up(first_line(e, 160))) from None
    finally:
        watchdog.cancel()
    if settings is not None:
        counts = gather("process count", str(settings[1]))
        if len(set(counts)) > 1 or jax.process_count() != settings[1]:
            said = ", ".join(f"process {i}: {c}" for i, c in enumerate(counts))
            raise JmergeError(f"the processes disagree on the process count ({said}; the cluster has "
                              f"{jax.process_count()})")


def _why_not_joined(settings) -> str:
    if settings is None:
        return "the cluster's processes did not all register"
    coordinator, _, pid = settings
    host, _, port = coordinator.rpartition(":")
    if pid == 0:
        return "not every process registered with this coordinator"
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=2).close()
    except OSError as e:
        return f"nothing answers at {coordinator}: {e.strerror or e}"
    return "the coordinator answers, but not every process registered"


def _leave(code: int, message: str) -> None:
    sys.stderr.write(f"jmerge: error: {message}\n")
    sys.stderr.flush()
    os._exit(code)


def finish() -> None:
    """Leave the run together: the coordinator (process 0) must not go while others still talk
    to it, or jax aborts them. After a lost peer there is nobody to leave with: jax's shutdown
    would wait for it and then abort."""
    if count() > 1 and not _peer_lost:
        import jax
        try:
            jax.distributed.shutdown()
        except Exception:  # noqa: BLE001  (a peer already gone: nothing left to leave cleanly)
            pass


def _client():
    if "jax" not in sys.modules:
        return None
    from jax._src import distributed as jax_distributed
    return jax_distributed.global_state.client


def count() -> int:
    """The number of processes (1 without a distributed start)."""
    if _client() is None:
        return 1
    import jax
    return jax.process_count()


def index() -> int:
    if _client() is None:
        return 0
    import jax
    return jax.process_index()


def is_lead() -> bool:
    """Process 0: the one that writes, logs and shows progress."""
    return index() == 0


def _barrier_timeout() -> float:
    return _seconds(BARRIER_TIMEOUT_ENV, BARRIER_TIMEOUT)


def _lost(what: str, t: float) -> PeerLost:
    global _peer_lost
    _peer_lost = True
    return PeerLost(f"process {index()}: the other processes did not reach {what} within {t:g} s (one "
                    f"died, hangs or runs something else; {BARRIER_TIMEOUT_ENV} sets the wait)")


def barrier(what: str) -> None:
    """Wait until every process is here (`what` names the point, for the error)."""
    client = _client()
    if client is None or count() == 1:
        return
    t = _barrier_timeout()
    try:
        client.wait_at_barrier(_key(what), int(t * 1000))
    except Exception:  # noqa: BLE001  (jax's runtime error: a timeout or a peer reported gone)
        raise _lost(what, t) from None


def gather(what: str, value: str) -> list[str]:
    """Every process's `value`, by process index."""
    client = _client()
    if client is None or count() == 1:
        return [value]
    t = _barrier_timeout()
    key = _key(what)
    try:
        client.key_value_set(f"{key}/{index()}", value)
        return [client.blocking_key_value_get(f"{key}/{i}", int(t * 1000)) for i in range(count())]
    except Exception:  # noqa: BLE001
        raise _lost(what, t) from None


def _key(what: str) -> str:
    return f"jmerge/{next(_calls)}/{what}"


def announce(what: str, error: JmergeError) -> None:
    """This process's failure, posted where the others' `raise_any(what, ...)` will find it,
    without waiting for them (an interrupted process leaves at once)."""
    client = _client()
    if client is None or count() == 1:
        return
    try:
        client.key_value_set(f"{_key(what)}/{index()}", _error_text(error))
    except Exception:  # noqa: BLE001  (the coordinator is gone: nobody is left to tell)
        pass


def _error_text(e: JmergeError) -> str:
    return json.dumps([str(e), e.exit_code])


def _raise(text: str, who: int | None = None) -> None:
    message, code = json.loads(text)
    e = JmergeError(message if who in (None, index()) else f"process {who}: {message}")
    e.exit_code = code
    raise e


def on_lead(what: str, fn):
    """`fn()` run by process 0 alone; a JmergeError it raises is raised on every process."""
    if count() == 1:
        return fn()
    result, text = None, ""
    if is_lead():
        try:
            result = fn()
        except JmergeError as e:
            text = _error_text(e)
    verdict = gather(what, text)[0]
    if verdict:
        _raise(verdict)
    return result


def raise_any(what: str, error: JmergeError | None) -> None:
    """Every process says how its part went; the first failure is raised on all of them (the
    others name the process it came from), so they fail together instead of waiting for it."""
    if count() == 1:
        if error is not None:
            raise error
        return
    texts = gather(what, "" if error is None else _error_text(error))
    for who, text in enumerate(texts):
        if text:
            _raise(text, who)


def _digest(p: Path) -> str:
    h = hashlib.sha256()
    if p.is_dir():
        for f in sorted(q for q in p.rglob("*") if q.is_file()):
            h.update(f"{f.relative_to(p)}\0{_digest(f)}\0".encode())
        return h.hexdigest()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_same_files(paths) -> None:
    """Every process read the same bytes for each of `paths` (a config, data files, folders of
    them), or the run stops on all of them before any work, naming the file and the processes."""
    if count() == 1:
        return
    mine = {}
    for p in dict.fromkeys(str(p) for p in paths if p is not None):
        try:
            mine[p] = _digest(Path(p)) if os.path.exists(p) else "missing"
        except OSError as e:
            mine[p] = f"unreadable ({e.strerror})"
    seen = [json.loads(t) for t in gather("same files", json.dumps(mine, sort_keys=True))]
    for p in sorted(set().union(*seen)):
        values = [s.get(p, "not read") for s in seen]
        if len(set(values)) > 1:
            groups: dict[str, list[int]] = {}
            for i, v in enumerate(values):
                groups.setdefault(v, []).append(i)
            said = "; ".join(f"process{'es' if len(ids) > 1 else ''} {', '.join(map(str, ids))}: "
                             f"{v[:12] if len(v) == 64 else v}" for v, ids in groups.items())
            raise JmergeError(f"{p}: differs between the processes ({said}); every process must read "
                              f"the same file")
