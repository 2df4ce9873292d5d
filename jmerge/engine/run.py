"""The entry point: a config (or plan) and an output directory -> a merged HF directory, streamed
or in memory (`footprint.choose_mode`), optionally with an orbax copy."""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

from jmerge import sharding as shd
from jmerge.engine.config import load_plan
from jmerge.engine.footprint import choose_mode
from jmerge.engine.inputs import check_plan, plan_inputs
from jmerge.engine.memory import memory_merge
from jmerge.engine.options import MergeOptions
from jmerge.engine.plan import MergePlan
from jmerge.engine.prepare import prepare
from jmerge.engine.stream import stream_merge
from jmerge.io import hf
from jmerge.io.atomic import check_target


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
    mesh = options.mesh
    mode = choose_mode(p, options.mode, mesh or shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}))
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
