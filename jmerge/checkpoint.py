"""Resumable run state (training and search): orbax checkpoints of a pytree every N steps.

A run directory holds `step_XXXXXXXX/` orbax checkpoints (the last two kept) and `meta.json` with
the step and a fingerprint of everything that defines the run. Resuming with another fingerprint
is refused, so a rerun after a crash continues exactly where it stopped and a changed config never
silently picks up a stale state.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import jax

from jmerge.errors import JmergeError
from jmerge.io.files import field, read_json


def fingerprint(*parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class RunCheckpoint:
    def __init__(self, root: str | Path, fp: str, keep: int = 2):
        self.root, self.fp, self.keep = Path(root), fp, keep

    def save(self, step: int, state) -> None:
        if jax.process_count() > 1:
            return self._save_multiprocess(step, state)
        from jmerge.io.orbax_io import _save
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f".step_{step:08d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        _save(tmp, state)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        self._publish(step)

    def _save_multiprocess(self, step: int, state) -> None:
        """orbax's save is collective (each process writes its own shards and orbax finalises the
        directory atomically); clearing a stale directory, the step pointer and pruning are done
        once, by process 0, between barriers."""
        from jmerge.distributed import barrier
        from jmerge.io.orbax_io import _save
        final = self.root / f"step_{step:08d}"
        lead = jax.process_index() == 0
        if lead:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(final, ignore_errors=True)  # a crash after writing it, before the pointer
        barrier(f"checkpoint {step} cleared")
        _save(final, state)
        barrier(f"checkpoint {step} written")
        if lead:
            self._publish(step)
        barrier(f"checkpoint {step} done")

    def _publish(self, step: int) -> None:
        meta = self.root / "meta.json.tmp"
        meta.write_text(json.dumps({"fingerprint": self.fp, "step": step}))
        meta.replace(self.root / "meta.json")  # the step pointer moves only once the state is whole
        for old in sorted(self.root.glob("step_*"))[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def restore(self, like) -> tuple[int, Any] | None:
        """(step, state shaped like `like`) from the latest checkpoint, or None if there is none.
        A damaged checkpoint (meta or orbax files) is one JmergeError saying how to start over."""
        meta = self.root / "meta.json"
        if not meta.exists():
            return None
        start_over = f"delete {self.root} to start this run over"
        try:
            m = read_json(meta, "checkpoint meta")
            fp = field(m, "fingerprint", str, meta, "checkpoint meta")
            step = field(m, "step", int, meta, "checkpoint meta")
        except JmergeError as e:
            raise JmergeError(f"{e}; the checkpoint is damaged: {start_over}") from None
        if fp != self.fp:
            raise JmergeError(f"{self.root}: checkpoint is from another model or config "
                              "(remove it or choose another output directory)")
        if step < 0:
            raise JmergeError(f"{meta}: step {step} is negative; the checkpoint is damaged: {start_over}")
        from jmerge.io.orbax_io import _load, quiet_reads
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like)
        where = self.root / f"step_{step:08d}"
        with quiet_reads():
            try:
                return step, _load(where, target)
            except Exception as e:  # noqa: BLE001  (orbax and tensorstore raise many kinds for bad files)
                failure = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:160]}"
        raise JmergeError(f"{where}: checkpoint cannot be restored ({failure}); the checkpoint is damaged: "
                          f"{start_over}")
