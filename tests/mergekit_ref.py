"""mergekit 0.1.5 itself, as a reference for differential tests.

mergekit lives in its own virtualenv, made on first use by the test run and reused after:
`$MERGEKIT_VENV`, default `<repo>/.venv-mergekit`. It is never a jmerge dependency. torch is
pinned to 2.13.0 because that is the CPU wheel on this machine's disk; an unpinned torch would
pull a multi-GB CUDA build.
"""

from __future__ import annotations

import fcntl
import functools
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MERGEKIT = "mergekit==0.1.5"
TORCH = "torch==2.13.0"
INSTALL_TIMEOUT_S = 1800
MERGE_TIMEOUT_S = 600


def venv_dir() -> Path:
    return Path(os.environ.get("MERGEKIT_VENV", ROOT / ".venv-mergekit"))


def _installed(venv: Path) -> bool:
    """Whether the venv holds the pinned mergekit and torch (a half-made venv does not)."""
    py = venv / "bin" / "python"
    if not (py.exists() and (venv / "bin" / "mergekit-yaml").exists()):
        return False
    probe = ("import importlib.metadata as m, sys; "
             f"sys.exit(m.version('mergekit') != {MERGEKIT.split('==')[1]!r} "
             f"or m.version('torch').split('+')[0] != {TORCH.split('==')[1]!r})")
    return subprocess.run([str(py), "-c", probe], capture_output=True).returncode == 0


@functools.lru_cache(maxsize=None)
def mergekit_bin() -> Path:
    """The `mergekit-yaml` executable, installing mergekit into its venv first if needed.

    An exclusive file lock beside the venv makes parallel pytest workers wait for one install
    instead of racing pip into the same directory. A failed install raises with pip's output.
    """
    venv = venv_dir()
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.with_name(venv.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _installed(venv):
            _install(venv)
    return venv / "bin" / "mergekit-yaml"


def _install(venv: Path) -> None:
    steps = [[sys.executable, "-m", "venv", "--clear", str(venv)],
             [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", TORCH, MERGEKIT]]
    for cmd in steps:
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
        except subprocess.TimeoutExpired as e:
            raise RuntimeError(f"mergekit install timed out after {INSTALL_TIMEOUT_S} s: {' '.join(cmd)}") from e
        if r.returncode != 0:
            raise RuntimeError(f"mergekit install failed: {' '.join(cmd)} (exit {r.returncode})\n"
                               f"{r.stdout[-2000:]}\n{r.stderr[-6000:]}")
    if not _installed(venv):
        raise RuntimeError(f"mergekit install into {venv} finished but {MERGEKIT} / {TORCH} are not there")


# --allow-crimes lets mergekit merge whatever architectures jmerge accepts; no tokenizer is copied
# (the test models have none, and mergekit then fails). Threads are capped by OMP_NUM_THREADS
# (_env), not --num-threads: torch refuses to set its thread pools twice in one process.
FLAGS = ("--allow-crimes", "--no-lazy-unpickle", "--no-copy-tokenizer", "--random-seed", "0",
         "--quiet")


def _env() -> dict:
    """The hub offline (a typo in a model path fails instead of trying a download), no GPU, and
    neither the working directory nor PYTHONPATH on sys.path: run from this repository, its
    top-level `kernels/` would shadow the `kernels` package that transformers probes for."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", CUDA_VISIBLE_DEVICES="",
               PYTHONSAFEPATH="1", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
    return env


def _run(cmd: list[str], what: str, timeout: float) -> subprocess.CompletedProcess:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env())
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"mergekit timed out after {timeout} s on {what}") from e
    if r.returncode != 0:
        raise RuntimeError(f"mergekit failed on {what} (exit {r.returncode}):\n{r.stderr[-6000:]}")
    return r


def run_mergekit(config_path, out_dir, timeout: float = MERGE_TIMEOUT_S) -> Path:
    """Run `mergekit-yaml CONFIG OUT` on CPU; returns OUT. Raises with mergekit's stderr on failure."""
    _run([str(mergekit_bin()), str(config_path), str(out_dir), *FLAGS], str(config_path), timeout)
    return Path(out_dir)


_MANY = """
import json, sys, traceback
from mergekit.scripts.run_yaml import main
flags, jobs = json.loads(sys.argv[1]), json.loads(sys.argv[2])
errors = {}
for config, out in jobs:
    try:
        main([config, out, *flags], standalone_mode=False)
    except BaseException:
        errors[config] = traceback.format_exc()
print(json.dumps(errors))
"""


def run_python(code: str, *args: str, timeout: float = MERGE_TIMEOUT_S) -> str:
    """stdout of `python -c CODE ARGS...` in mergekit's venv (same environment as the merges);
    raises with its stderr on failure."""
    py = mergekit_bin().parent / "python"
    return _run([str(py), "-c", code, *args], "its python -c", timeout).stdout


def run_mergekit_many(jobs, timeout: float = MERGE_TIMEOUT_S) -> dict[str, str]:
    """`mergekit-yaml` on each (config, out) pair in one process of mergekit's venv, through its
    own command-line entry point: importing mergekit takes longer than merging a tiny model.
    Returns {config: mergekit's traceback} for the configs it failed on; raises if the process
    itself fails."""
    import json
    jobs = [(str(c), str(o)) for c, o in jobs]
    out = run_python(_MANY, json.dumps(FLAGS), json.dumps(jobs), timeout=timeout)
    return json.loads(out.strip().splitlines()[-1])
