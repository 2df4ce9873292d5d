"""`jmerge merge CONFIG.yml OUT_DIR`: merge models as a mergekit YAML describes, into an HF dir."""

from __future__ import annotations

import sys

from jmerge import distributed, dryrun
from jmerge.cli import ArgumentParser, quiet_jax
from jmerge.compile_cache import exported_dir


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="jmerge merge", description=__doc__)
    p.add_argument("config", help="mergekit-style YAML (models or slices, merge_method, parameters, ...)")
    p.add_argument("out", help="output HF directory (written to a temp dir, renamed into place)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--stream", action="store_const", const="stream", dest="mode",
                      help="tensor by tensor from disk to disk (bounded memory)")
    mode.add_argument("--in-memory", action="store_const", const="memory", dest="mode",
                      help="merge on the mesh, one tensor group at a time (the same bits as --stream)")
    p.add_argument("--seed", type=int, default=0, help="seed for random methods (DARE, DELLA); default 0")
    p.add_argument("--mesh", help="device mesh for --in-memory, e.g. fsdp=4,tensor=2 (default: one device)")
    p.add_argument("--max-shard-size", default="5GB", help="output shard size (default 5GB)")
    p.add_argument("--orbax", metavar="DIR", help="also write an orbax copy of the merged params")
    p.add_argument("--force", action="store_true", help="replace OUT (and the orbax DIR) if it exists")
    p.add_argument("--lenient", action="store_true",
                   help="warn about parameter names no merge method knows instead of refusing them")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="write NaN/Inf weights (in the inputs or the merged result) instead of refusing them")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    dryrun.add_flags(p)
    return p


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    quiet_jax()
    if dryrun.wanted(a):
        return dryrun.run("merge", a, argv)
    distributed.check_same_files([a.config])
    export_cache = exported_dir()  # the cache itself is on: jmerge.cli.run
    from jmerge import sharding
    from jmerge.engine import MergeOptions, merge

    mesh = sharding.make_mesh(a.mesh) if a.mesh else None
    r = merge(a.config, a.out, MergeOptions(
        mode=a.mode or "auto", seed=a.seed, mesh=mesh, force=a.force, orbax=a.orbax,
        max_shard_size=a.max_shard_size, progress=not a.quiet, lenient=a.lenient,
        allow_nonfinite=a.allow_nonfinite, export_cache=export_cache))
    for w in r.warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(f"merged -> {r.out} ({r.mode}): {r.n_tensors} tensors, {r.num_layers} layers, {r.seconds:.1f} s")
    return 0
