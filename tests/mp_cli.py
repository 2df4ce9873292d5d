"""Many CLI commands in one process, one after another, through `jmerge.cli.main` (the real entry
point): process start-up, jax initialisation and the distributed start are paid once for a whole
matrix of commands instead of once per command.

    python tests/mp_cli.py STEPS.json RESULTS.json

STEPS.json is a list; each item is an argv list (`["merge", "c.yaml", "out"]`, expected to exit 0)
or `{"argv": [...], "rc": N}` for a step expected to fail with N. RESULTS.json gets, after every
step, one `{"argv", "rc", "err": its last stderr line, "lines": how many it wrote, "seconds"}`
per step run so far. The worker stops at the first step whose exit code is not the expected one:
the processes of a multi-process run would otherwise fall out of step with each other and wait at
every later barrier for its whole timeout.
"""

import io
import json
import sys
import time

from jmerge import cli


class _Tee(io.TextIOBase):
    """stderr as it was, and a copy of what a step wrote to it."""

    def __init__(self, real):
        self.real, self.seen = real, io.StringIO()

    def write(self, s):
        self.seen.write(s)
        return self.real.write(s)

    def flush(self):
        self.real.flush()


def main(steps_file: str, results_file: str) -> int:
    with open(steps_file) as f:
        steps = json.load(f)
    results, real = [], sys.stderr
    for step in steps:
        argv, want = (step, 0) if isinstance(step, list) else (step["argv"], step["rc"])
        sys.stderr = tee = _Tee(real)
        started = time.monotonic()
        try:
            rc = cli.main(argv)
        finally:
            sys.stderr = real
        lines = [line for line in tee.seen.getvalue().splitlines() if line.strip()]
        results.append({"argv": argv, "rc": rc, "err": lines[-1] if lines else "", "lines": len(lines),
                        "seconds": round(time.monotonic() - started, 2)})
        with open(results_file, "w") as f:
            json.dump(results, f, indent=1)
        if rc != want:
            return 1
    return 0


if __name__ == "__main__":
    cli.leave(main(*sys.argv[1:]))
