"""How the task vectors of fine-tuned models relate (the model-similarity analysis of MergeAlign,
`jmerge inspect`): per-layer task-vector norms, pairwise cosine similarity and sign-conflict
fractions, overall and per layer, written to report.json and a PNG heatmap.

Task vectors are tau_i = theta_i - theta_base, read one tensor at a time (float32). The sign
conflict of two models is the share of entries, among those where both task vectors are nonzero,
whose signs differ.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np

from jmerge import distributed
from jmerge.errors import JmergeError, collect
from jmerge.io.files import dumps_json


def _bucket(name: str) -> str:
    if name.startswith("model.layers."):
        return name.split(".")[2]
    return "embed" if "embed" in name else "head"


def analyse(base, models: list, safemerge: dict | None = None) -> dict:
    """base, models: engine.ModelInput. Returns the report as a dict; with `safemerge` (the
    config's threshold and delta_from) also which tensors a SafeMERGE merge merges."""
    from jmerge.engine.prepare import read_tensor

    names = [n for n in base.source.names()]
    problems = []
    for m in models:
        have = set(m.source.names())
        for n in names:
            if n not in have:
                problems.append(f"{m.ref} lacks {n}")
            elif tuple(m.source.shape(n)) != tuple(base.source.shape(n)):
                problems.append(f"{m.ref}: {n} has shape {list(m.source.shape(n))}, base {list(base.source.shape(n))}")
    collect(problems, "models do not match the base")

    k = len(models)
    buckets: dict[str, dict] = {}
    nonfinite: list[str] = []  # "MODEL: TENSOR" holding NaN/Inf; their rows' numbers become NaN
    f32 = np.float32
    decisions: dict[str, tuple[bool, float | None]] = {}
    for n in names:
        b = buckets.setdefault(_bucket(n), {"sq": np.zeros(k), "dot": np.zeros((k, k)),
                                            "both": np.zeros((k, k)), "conflict": np.zeros((k, k))})
        theta0 = read_tensor(base, n, None).astype(f32).ravel()
        thetas = [read_tensor(m, n, None).astype(f32).ravel() for m in models]
        nonfinite += [f"{m.ref}: {n}" for m, x in zip([base] + list(models), [theta0] + thetas)
                      if not np.isfinite(x).all()]
        if safemerge is not None:
            decisions[n] = _safemerge_decision(read_tensor(base, n, None), [read_tensor(m, n, None) for m in models],
                                               **safemerge)
        taus = [x - theta0 for x in thetas]
        signs = [np.sign(t) for t in taus]
        for i in range(k):
            b["sq"][i] += float(np.dot(taus[i].astype(np.float64), taus[i]))
            for j in range(i + 1, k):
                d = float(np.dot(taus[i].astype(np.float64), taus[j]))
                both = (signs[i] != 0) & (signs[j] != 0)
                nb, nc = float(both.sum()), float((both & (signs[i] != signs[j])).sum())
                for a, c in ((i, j), (j, i)):
                    b["dot"][a, c] += d
                    b["both"][a, c] += nb
                    b["conflict"][a, c] += nc

    def cos(sq, dot):
        norms = np.sqrt(sq)
        out = dot / np.maximum(np.outer(norms, norms), 1e-30)
        np.fill_diagonal(out, 1.0)
        return out

    def conflict(bk):
        out = bk["conflict"] / np.maximum(bk["both"], 1)
        np.fill_diagonal(out, 0.0)
        return out

    order = sorted((x for x in buckets if x.isdigit()), key=int)
    rows = (["embed"] if "embed" in buckets else []) + order + (["head"] if "head" in buckets else [])
    total = {key: sum(buckets[r][key] for r in rows) for key in ("sq", "dot", "both", "conflict")}
    refs = [m.ref for m in models]
    pairs = list(itertools.combinations(range(k), 2))
    return {
        "base": base.ref,
        "models": refs,
        "rows": rows,  # embed, layer indices, head (final norm + lm_head)
        "norm": {r: np.sqrt(total["sq"][i]).item() for i, r in enumerate(refs)},
        "norm_per_row": {ref: [float(np.sqrt(buckets[row]["sq"][i])) for row in rows] for i, ref in enumerate(refs)},
        "cosine": cos(total["sq"], total["dot"]).tolist(),
        "sign_conflict": conflict(total).tolist(),
        "cosine_per_row": {f"{refs[i]} | {refs[j]}": [float(cos(buckets[r]["sq"], buckets[r]["dot"])[i, j]) for r in rows]
                           for i, j in pairs},
        "sign_conflict_per_row": {f"{refs[i]} | {refs[j]}": [float(conflict(buckets[r])[i, j]) for r in rows]
                                  for i, j in pairs},
        "nonfinite": nonfinite,
        **({"safemerge": dict(safemerge, merged=[n for n, (m, _) in decisions.items() if m],
                              cosine={n: c for n, (_, c) in decisions.items() if c is not None})}
           if safemerge is not None else {}),
    }


def _safemerge_decision(base, models, threshold: float, delta_from: str) -> tuple[bool, float | None]:
    """(whether `safemerge` merges this tensor, its projection cosine; None for 1-D tensors),
    from the method's own functions."""
    from jmerge.merge.safe_lora import fine_tune_delta, projection_cosine
    from jmerge.merge.safemerge import safemerge_layers
    merged = bool(safemerge_layers(base, models, threshold=threshold, delta_from=delta_from))
    if np.ndim(base) != 2:
        return merged, None
    dw = fine_tune_delta("safemerge", base, models, delta_from)
    cos, _ = projection_cosine(np.asarray(models[1], np.float32) - np.asarray(base, np.float32), dw)
    return merged, float(cos)


def safemerge_settings(config: str | Path) -> dict | None:
    """The threshold and delta_from of a safemerge config (None for another method)."""
    from jmerge.engine import load_plan
    from jmerge.merge import registry
    plan = load_plan(config)
    if plan.method.name != "safemerge":
        return None
    defaults = registry.get("safemerge").params
    out = {k: plan.params.get(k, defaults[k].default) for k in ("threshold", "delta_from")}
    if not isinstance(out["threshold"], (int, float)):
        raise JmergeError(f"{config}: inspect's SafeMERGE report needs one threshold, got {out['threshold']!r}")
    if len(plan.referenced()) != 3:
        raise JmergeError(f"{config}: SafeMERGE takes a base and two models (domain fine-tune, safety model)")
    return {"threshold": float(out["threshold"]), "delta_from": str(out["delta_from"])}


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    refs = report["models"]
    short = [Path(r.split("+")[0]).name or r for r in refs]
    k = len(refs)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5), gridspec_kw={"width_ratios": [2.2, 1, 1]})
    norms = np.array([report["norm_per_row"][r] for r in refs])
    im = axes[0].imshow(norms, aspect="auto", cmap="viridis")
    axes[0].set_title("task-vector norm per layer")
    axes[0].set_yticks(range(k), short)
    step = max(1, len(report["rows"]) // 16)
    axes[0].set_xticks(range(0, len(report["rows"]), step), report["rows"][::step])
    fig.colorbar(im, ax=axes[0])
    for ax, key, title, cmap, lim in ((axes[1], "cosine", "cosine(τi, τj)", "RdBu_r", (-1, 1)),
                                      (axes[2], "sign_conflict", "sign conflict", "magma", (0, 1))):
        m = np.array(report[key])
        im = ax.imshow(m, cmap=cmap, vmin=lim[0], vmax=lim[1])
        ax.set_title(title)
        ax.set_xticks(range(k), short, rotation=45, ha="right")
        ax.set_yticks(range(k), short)
        for i in range(k):
            for j in range(k):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if abs(m[i, j]) > 0.6 else "black")
        fig.colorbar(im, ax=ax)
    fig.suptitle(f"task vectors against {Path(report['base']).name}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def config_models(config: str | Path) -> tuple[str, list[str], Path]:
    """The base_model of a merge config, its other models, and the folder they are relative to."""
    from jmerge.engine import load_plan
    plan = load_plan(config)
    if not plan.base_model:
        raise JmergeError(f"{config}: inspect needs a base_model")
    models = [r for r in plan.referenced() if r != plan.base_model]
    return plan.base_model, models, Path(config).resolve().parent


def inspect(base: str, models: list[str], out: str | Path, config_dir: Path = Path("."),
            force: bool = False, config: str | Path | None = None) -> dict:
    """The report of `analyse`, written to `out`; `config`: the merge config the models came from
    (read too, so the report must not land on it)."""
    from jmerge.engine import open_model
    from jmerge.io.atomic import atomic_dir, check_target, model_inputs
    from jmerge.io.source import locate
    inputs = [x for m in (base, *models) for x in model_inputs(locate(m, config_dir))] + ([config] if config else [])
    # Before any weight is read: the report must not land on (or over) what it reads.
    check_target(out, force, inputs)
    if not models:
        raise JmergeError("inspect needs at least one model besides the base")
    b = open_model(base, config_dir)
    ms = [open_model(m, config_dir) for m in models]
    report = analyse(b, ms, safemerge_settings(config) if config else None)
    with atomic_dir(out, force, inputs=inputs) as tmp:
        if distributed.is_lead():  # every process computed the same report; one writes it
            (tmp / "report.json").write_text(dumps_json(report, indent=2))  # NaN -> null: strict JSON
            plot(report, tmp / "heatmap.png")
    return report
