"""`python -m jmerge.search --config configs/X.yaml` (also `jmerge search`)."""

from __future__ import annotations


from jmerge.cli import ArgumentParser, leave, run


def main(argv=None) -> int:
    p = ArgumentParser(prog="jmerge search", description="Search merge coefficients and masks on "
                       "safety + domain data, evaluate every merge, write models and a report.")
    p.add_argument("--config", required=True, help="search config (YAML), e.g. configs/demo.yaml")
    p.add_argument("--out", help="override the config's output directory")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    a = p.parse_args(argv)
    from jmerge.io.atomic import check_workspace
    from jmerge.search import config as C
    from jmerge.search.run import run as run_search, search_inputs
    cfg = C.load(a.config)
    if a.out:
        from pathlib import Path
        cfg.out = Path(a.out)
    # before the models load
    check_workspace(cfg.out, [a.config, *search_inputs(cfg)], data_dirs=[cfg.eval.get("data")])
    report = run_search(cfg, progress=not a.quiet)
    from jmerge.eval.report import markdown
    print(markdown(report))
    print(f"\nreport: {cfg.out / 'report'}")
    return 0


if __name__ == "__main__":
    leave(run(main))
