"""The entry point: a config (or plan) and an output directory -> a merged HF directory, streamed
or in memory (`choose_mode`), optionally with an orbax copy."""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from pathlib import Path

import jax

from jmerge import sharding as shd
from jmerge.engine.config import load_plan
from jmerge.engine.inputs import Checked, check_plan, plan_inputs
from jmerge.engine.memory import memory_merge
from jmerge.engine.options import MergeOptions
from jmerge.engine.plan import MergePlan
from jmerge.engine.prepare import prepare
from jmerge.engine.stream import stream_merge
from jmerge.io import hf
from jmerge.io.atomic import check_target

# Streaming is chosen when the inputs would take more than this share of available memory.
STREAM_FRACTION = 0.45


def available_memory() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def choose_mode(c: Checked, mode: str) -> str:
    """On CPU streaming is both faster and smaller (measured: scripts/bench_merge.py), so `auto`
    streams there; on accelerators it merges in memory when the inputs fit."""
    if mode in ("stream", "memory"):
        return mode
    devs = jax.devices()
    if devs[0].platform == "cpu":
        return "stream"
    need = sum(m.nbytes() for m in c.models.values())
    stats = devs[0].memory_stats() or {}
    limit = min(available_memory(), stats.get("bytes_limit", 0) * len(devs))
    return "stream" if need > STREAM_FRACTION * limit else "memory"


@dataclasses.dataclass
class MergeResult:
    out: Path
    mode: str
    seconds: float
    n_tensors: int
    num_layers: int
    warnings: list[str]


def merge(config: str | Path | MergePlan, out: str | Path, options: MergeOptions | None = None,
          **fields) -> MergeResult:
    """Merge as `config` says into `out`. `options` (default: MergeOptions()), with any of its
    fields given as keywords instead or on top (`merge(cfg, out, mode="stream")`)."""
    t0 = time.perf_counter()
    options = dataclasses.replace(options or MergeOptions(), **fields)
    out = Path(out)
    plan = config if isinstance(config, MergePlan) else load_plan(config, lenient=options.lenient)
    inputs = plan_inputs(plan)
    check_target(out, options.force, inputs)
    if options.orbax is not None:
        # written after OUT: replacing OUT, or a folder holding it, would lose it
        check_target(options.orbax, options.force, inputs, outputs=[out])
    c = check_plan(plan)
    p = prepare(c, allow_nonfinite=options.allow_nonfinite)
    mode = choose_mode(c, options.mode)
    mesh = options.mesh
    if mode == "stream":
        stream_merge(p, out, options)
    else:
        mesh = mesh or shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1})
        merged = memory_merge(p, out, mesh, options)
    if options.orbax is not None:
        from jmerge.io import load_model, orbax_io
        if mode == "stream":
            m = load_model(out, mesh=mesh or shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}))
            merged = m.params
        orbax_io.save_orbax(merged, p.out_cfg, options.orbax, force=options.force,
                            tokenizer_writer=lambda d: _copy_extras(out, d))
    return MergeResult(out, mode, time.perf_counter() - t0, len(c.resolved.jobs), p.out_cfg.num_layers,
                       plan.warnings + c.warnings + p.warnings)


def _copy_extras(src: Path, dst: Path) -> None:
    hf.copy_tokenizer(src, dst)
    if (src / "chat_template.jinja").exists():
        shutil.copy2(src / "chat_template.jinja", dst / "chat_template.jinja")
