"""`jmerge search --config X.yaml` (also `python -m jmerge.search`): the main job."""

from __future__ import annotations

from jmerge import distributed, dryrun
from jmerge.cli import ArgumentParser


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="jmerge search", description="Search merge coefficients and masks on "
                       "safety + domain data, evaluate every merge, write models and a report.")
    p.add_argument("--config", required=True, help="search config (YAML), e.g. configs/demo.yaml")
    p.add_argument("--out", help="override the config's output directory")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    dryrun.add_flags(p, prompt_tokens="the eval's longest prompt in tokens (default: the config's max_len)")
    return p


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    if dryrun.wanted(a):
        return dryrun.run("search", a, argv)
    from jmerge.eval.prompts import data_dir
    from jmerge.io.atomic import check_workspace
    from jmerge.search import config as C
    from jmerge.search.outputs import search_data, search_inputs
    from jmerge.search.run import run as run_search
    cfg = C.load(a.config)
    if a.out:
        import dataclasses
        from pathlib import Path
        cfg = dataclasses.replace(cfg, out=Path(a.out))
    # before the models load
    check_workspace(cfg.out, [a.config, *search_inputs(cfg)], data_dirs=[cfg.eval.data])
    # every process must read the same data (not the models: hashing a 70B would take minutes)
    distributed.check_same_files([a.config, *search_data(cfg), data_dir(cfg.eval.data)])
    report = run_search(cfg, progress=not a.quiet)
    from jmerge.eval.report import markdown
    print(markdown(report))
    print(f"\nreport: {cfg.out / 'report'}")
    return 0

