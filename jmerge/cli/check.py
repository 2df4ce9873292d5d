"""`jmerge check CONFIG.yml`: a merge config's problems, before any merge."""

from __future__ import annotations

import sys

from jmerge import distributed, engine
from jmerge.cli import ArgumentParser


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="jmerge check", 
                       description="`jmerge check CONFIG.yml`: everything that can be wrong with a merge, "
                                   "found before any merge.")
    p.add_argument("config", help="mergekit-style YAML")
    p.add_argument("--no-scan", action="store_true", help="headers only: skip the NaN/Inf pass over the weights")
    p.add_argument("--lenient", action="store_true",
                   help="warn about parameter names no merge method knows instead of refusing them")
    return p


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    distributed.check_same_files([a.config])
    c = engine.check(a.config, scan_values=not a.no_scan, lenient=a.lenient)
    for w in c.plan.warnings + c.warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(f"ok: {c.plan.method.name}, {len(c.models)} models, {len(c.resolved.jobs)} output tensors, "
          f"{c.resolved.num_layers} layers ({c.out_cfg.family})")
    return 0
