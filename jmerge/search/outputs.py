"""What a search job writes into its output directory:

    models/<name>/          merged HF directories (searched merges)
    params/<name>.json      learnt coefficients / weights; params/masks.safetensors (SOMF)
    checkpoints/<search>/   resumable state (kill -9 and rerun continues; written by the searches)
    report/                 report.json, report.md, safety_vs_domain.png, safety_vs_overrefusal.png,
                            loss_curves.png
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import jax
import numpy as np

from jmerge import distributed
from jmerge.search.parametrisations import Masks
from jmerge.io.atomic import check_workspace
from jmerge.search.settings import SearchConfig

if TYPE_CHECKING:
    from jmerge.search.run import SearchRun


def save_masks(out: Path, theta, param: Masks) -> None:
    """Keep probabilities σ(logits) per HF tensor name (mask 0 when masks are shared), as
    float32 safetensors that the `somf` merge method reads (row masks have shape [out, 1]), in
    `out`/params/masks.safetensors. One tensor at a time reaches the host: every process joins
    its gather, process 0 writes it."""
    from jmerge.sharding import host_value
    from jmerge.io.safetensors_io import write_file
    probs = param.probabilities(theta)
    tensors = []  # (name in the file, leaf, layer of a stacked leaf or None)
    for part, stacked in (("layers", True), ("rest", False)):
        for j, tree in enumerate(probs[part]):
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
                path = ".".join(k.key for k in p)
                for i in range(x.shape[0]) if stacked else [None]:
                    name = f"model.layers.{i}.{path}" if stacked else path
                    tensors.append((f"{j}/{name}" if len(probs[part]) > 1 else name, x, i))
    items = [(name, np.dtype(np.float32), tuple(x.shape if i is None else x.shape[1:])) for name, x, i in tensors]
    arrays = (host_value(x if i is None else x[i]).astype(np.float32) for _, x, i in tensors)
    if not distributed.is_lead():
        for _ in arrays:
            pass
        return
    dest = out / "params"
    dest.mkdir(parents=True, exist_ok=True)
    write_file(dest / ".masks.safetensors.tmp", items, arrays, {"format": "jmerge-somf-mask"})
    (dest / ".masks.safetensors.tmp").replace(dest / "masks.safetensors")


def slug(name: str) -> str:
    """A model's directory and params file name: its report name without the kind prefix."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name.split(":", 1)[-1])


def search_inputs(cfg: SearchConfig) -> list:
    """Every path a search reads but its eval data directory: its output directory must not be,
    hold or lie inside any."""
    return [cfg.source, cfg.base, *cfg.experts.values(), *search_data(cfg)]


def search_data(cfg: SearchConfig) -> list:
    """The files a search reads besides the models (and the eval data directory)."""
    return [*(d.path for d in cfg.data.values()), cfg.eval.harmful, cfg.eval.domain, cfg.eval.benign]


def open_outputs(job: SearchRun) -> Path:
    """The output directory, checked (it must not be, hold or lie inside an input) before the
    first searched merge is saved into it."""
    out = distributed.on_lead(f"{job.out} checked", lambda: check_workspace(
        job.out, search_inputs(job.c), data_dirs=[job.c.eval.data])) or Path(job.out)
    if distributed.is_lead():
        (out / "models").mkdir(parents=True, exist_ok=True)
        (out / "params").mkdir(parents=True, exist_ok=True)
    return out


def save_searched(job: SearchRun, out: Path, name: str, params, info: dict) -> None:
    """One searched merge as an HF directory and its params file. Every process joins the
    export (`hf.save_hf` gathers tensor by tensor); process 0 alone writes files."""
    from jmerge.io import hf
    hf.save_hf(params, job.model_cfg, out / "models" / slug(name), force=True, tokenizer_writer=job.write_tokenizer)
    if distributed.is_lead():
        (out / "params" / f"{slug(name)}.json").write_text(json.dumps(info, indent=1, default=float))


def write_outputs(job: SearchRun, out: Path, report: dict) -> None:
    """The report's directory (every process joins it; process 0 writes)."""
    from jmerge.eval.report import write_report
    from jmerge.io.atomic import atomic_dir
    with atomic_dir(out / "report", force=True, inputs=search_inputs(job.c),
                    data_dirs=[job.c.eval.data]) as tmp:
        if distributed.is_lead():
            write_report(report, tmp)
            _loss_curves(job.logs, tmp / "loss_curves.png")


def _loss_curves(logs: dict[str, list], path: Path) -> None:
    curves = {k: v for k, v in logs.items() if v}
    if not curves:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(curves), figsize=(4.5 * len(curves), 3.4), squeeze=False)
    for ax, (name, rows) in zip(axes[0], curves.items()):
        if "loss" in rows[0]:
            ax.plot([r["step"] for r in rows], [r["loss"] for r in rows])
            ax.set_xlabel("step")
        else:
            ax.plot([r["generation"] for r in rows], [r["best"] for r in rows], label="best")
            ax.plot([r["generation"] for r in rows], [r["mean"] for r in rows], label="mean")
            ax.set_xlabel("generation")
            ax.legend()
        ax.set_title(name)
        ax.set_ylabel("objective")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
