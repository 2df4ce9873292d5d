"""How much of a device a merge needs, from its compiled programs' memory analysis, and the
mode `auto` picks from that: streaming unless the in-memory merge fits the devices."""

from __future__ import annotations

from pathlib import Path

import jax
from jax.sharding import Mesh

from jmerge.engine.lowered import memory_programs, memory_stages, stream_programs
from jmerge.engine.plan import MergePlan
from jmerge.engine.prepare import Prepared

# The share of a device the in-memory merge may plan to use: the analysis leaves out the
# allocator's fragmentation and the runtime's own buffers.
HEADROOM = 0.9


def program_peak(compiled) -> int:
    """Bytes per device a compiled program holds at once: arguments, outputs, temporaries."""
    m = compiled.memory_analysis()
    return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes


def memory_need(p: Prepared, mesh: Mesh, seed: int = 0) -> tuple[int, str]:
    """(peak bytes per device of the in-memory merge on `mesh`, the stage where it peaks): each
    stage's compiled peak plus what is alive beside it (the merged leaves placed so far, the
    current leaf's merged slices, a layer loop's outputs so far). Each distinct program is
    compiled once."""
    peaks: dict[tuple, int] = {}
    best = (0, "")
    for s in memory_stages(p, mesh, seed):
        if s.key not in peaks:
            peaks[s.key] = program_peak(s.lowered.compile())
        best = max(best, (s.live + peaks[s.key], s.name))
    return best


def decide_mode(need: int, device_memory: int, platform: str | None = None) -> str:
    """`auto`'s choice: on CPU streaming (faster and smaller there: scripts/bench_merge.py),
    elsewhere in memory when the merge's per-device need fits HEADROOM of a device."""
    if platform == "cpu":
        return "stream"
    return "memory" if need <= HEADROOM * device_memory else "stream"


def local_device_memory() -> int | None:
    """What one local accelerator lets jax allocate (None on CPU or when it does not say)."""
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("bytes_limit") or None


def choose_mode(p: Prepared, mode: str, mesh: Mesh) -> str:
    """The mode a merge of `p` on `mesh` runs in: `stream`/`memory` as given; `auto` by
    `decide_mode` on the local devices."""
    if mode in ("stream", "memory"):
        return mode
    platform = jax.devices()[0].platform
    limit = local_device_memory()
    if platform == "cpu" or limit is None:
        return "stream"
    return decide_mode(memory_need(p, mesh)[0], limit, platform)


def merge_programs(config: str | Path | MergePlan | Prepared, mesh: Mesh, mode: str = "auto",
                   device_memory: int | None = None, *, platform: str | None = None, seed: int = 0,
                   lenient: bool = False) -> tuple[dict[str, jax.stages.Lowered], str]:
    """(the programs a merge of `config` would compile, by name; the mode they are for).

    `config`: a merge YAML path, a MergePlan or a Prepared; its models may be directories
    holding only config.json (`abstract.open_config_only`: names, shapes and dtypes from the
    config). `mode`: "memory" (every distinct program of the in-memory merge on `mesh`: per
    group a layer step and its stack, or one merge call; per leaf its placement in the params'
    sharding), "stream" (the per-tensor programs, one per distinct input signature, largest
    first, on one device) or "auto" (the one `decide_mode(memory_need(...), device_memory,
    platform)` picks; `device_memory` is then required; `platform` None decides by memory
    alone, "cpu" always streams as a CPU run would). Names: "<tensor or leaf>: <stage>" for
    memory, the first output tensor for stream. Raises JmergeError on a bad plan."""
    from jmerge.engine.abstract import abstract_prepared
    p = config if isinstance(config, Prepared) else abstract_prepared(config, lenient=lenient)
    if mode == "auto" and platform == "cpu":
        mode = "stream"
    elif mode == "auto":
        if device_memory is None:
            raise ValueError("merge_programs(mode='auto') needs device_memory")
        mode = decide_mode(memory_need(p, mesh, seed)[0], device_memory, platform)
    programs = memory_programs(p, mesh, seed) if mode == "memory" else stream_programs(p, seed)
    return programs, mode
