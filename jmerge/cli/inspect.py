"""`jmerge inspect`: how the task vectors of fine-tuned models relate (the model-similarity
analysis of MergeAlign): per-layer task-vector norms, pairwise cosine similarity and sign-conflict
fractions, overall and per layer, written to report.json and a PNG heatmap.

    jmerge inspect CONFIG.yml --out DIR          (base_model and the other models of a config)
    jmerge inspect --base B --models M1 M2 --out DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

from jmerge.cli import ArgumentParser


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="jmerge inspect", description=__doc__.splitlines()[0])
    p.add_argument("config", nargs="?", help="mergekit-style YAML (uses its base_model and models)")
    p.add_argument("--base", help="base model (instead of a config)")
    p.add_argument("--models", nargs="+", help="fine-tuned models (instead of a config)")
    p.add_argument("--out", required=True, help="directory for report.json and heatmap.png")
    p.add_argument("--force", action="store_true", help="replace an existing --out directory")
    return p


def main(argv=None) -> int:
    p = parser()
    a = p.parse_args(argv)
    if a.config and (a.base or a.models):
        p.error("give a config or --base/--models, not both")
    if not a.config and not (a.base and a.models):
        p.error("give a config, or both --base and --models")
    import numpy as np

    from jmerge.task_vectors import config_models, inspect
    base, models, cdir = config_models(a.config) if a.config else (a.base, a.models, Path("."))
    r = inspect(base, models, a.out, cdir, force=a.force, config=a.config)
    if r["nonfinite"]:
        bad = r["nonfinite"]
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        print(f"warning: NaN/Inf weights in {'; '.join(bad[:3])}{more}: the norms and cosines that "
              "include them are null in report.json", file=sys.stderr)
    cos = np.array(r["cosine"])
    off = cos[~np.eye(len(cos), dtype=bool)]
    print(f"inspected {len(models)} task vectors over {len(r['rows'])} rows -> {a.out}/report.json, "
          f"heatmap.png" + (f"; mean pairwise cosine {off.mean():.3f}" if off.size else ""))
    return 0
