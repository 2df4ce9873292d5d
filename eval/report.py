"""Evaluation reports: one JSON with every number and generation, a Markdown table, PNG scatters.

The report dict (what `jmerge eval` builds and `write_report` writes):

    {"created": ISO time, "settings": {...},
     "models": [{"name": ..., "path": ..., "suites": {"safety": ..., "overrefusal": ...,
                                                     "domain": ...}}]}

Each suite entry is what `jmerge.eval.suites` returns for it. `headline` pulls the few numbers
a table row shows. The scatters put each model at (domain score, safety) and at (safe-prompt
compliance, safety), with intervals and the Pareto front; a pair whose suites did not run is not
drawn.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

JSON_NAME, MARKDOWN_NAME, PNG_NAME = "report.json", "report.md", "safety_vs_domain.png"
OVERREFUSAL_PNG_NAME = "safety_vs_overrefusal.png"


def headline(entry: dict) -> dict:
    """{column: summary dict {"mean", "lo", "hi", "n"} or a float} for one model's suites."""
    s = entry.get("suites", {})
    row = {}
    if "safety" in s:
        row["safety refusal ↑"] = s["safety"]["refusal"]
        if "unsafe" in s["safety"]:
            row["unsafe (judge) ↓"] = s["safety"]["unsafe"]
    if "overrefusal" in s:
        row[overrefusal_column(s["overrefusal"])] = s["overrefusal"]["compliance"]
    for variant, rate in s.get("jailbreak", {}).get("refusal", {}).items():
        row[f"jailbreak {variant} refusal ↑"] = rate
    if "domain" in s:
        row["domain score ↑"] = s["domain"]["score"]
        for name, task in s["domain"]["tasks"].items():
            row[f"{name} acc ↑"] = task["accuracy"]
    return row


def overrefusal_column(result: dict) -> str:
    """Named for its prompt set: XSTest only when every safe prompt came from it (a run without
    the XSTest files measures the built-in benign prompts, a different and easier set)."""
    sources = result.get("sources", ["xstest"])
    return "XSTest compliance ↑" if set(sources) == {"xstest"} else "safe-prompt compliance ↑"


def _cell(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, dict):
        return f"{v['mean']:.3f} [{v['lo']:.3f}, {v['hi']:.3f}] (n={v['n']})"
    return f"{v:.3f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def markdown(report: dict) -> str:
    models = report["models"]
    heads = [headline(m) for m in models]
    columns = list(dict.fromkeys(c for h in heads for c in h))
    lines = ["# jmerge eval", "",
             "Rates with bootstrap 95% intervals [lo, hi] and the number of prompts n.", ""]
    lines += _table(["model"] + columns, [[m["name"]] + [_cell(h.get(c)) for c in columns]
                                         for m, h in zip(models, heads)])
    for suite, key, what in (("safety", "refusal_by_source", "Safety refusal rate"),
                             ("safety", "refusal_by_category", "Safety refusal rate"),
                             ("overrefusal", "compliance_by_category",
                              next((overrefusal_column(m["suites"]["overrefusal"]).removesuffix(" ↑")
                                    for m in models if "overrefusal" in m["suites"]), ""))):
        cats = list(dict.fromkeys(c for m in models for c in m["suites"].get(suite, {}).get(key, {})))
        if len(cats) > 1:
            lines += ["", f"## {what} by {key.rsplit('_', 1)[1]}", ""]
            lines += _table(["model"] + cats, [[m["name"]] + [
                _cell(m["suites"].get(suite, {}).get(key, {}).get(c)) for c in cats] for m in models])
    for axis, names in fronts(report).items():
        if len(names) < len(models):
            lines += ["", f"Pareto front, safety vs {axis}: " + ", ".join(names)]
    settings = report.get("settings")
    if settings:
        lines += ["", "## Settings", ""] + [f"- {k}: `{v}`" for k, v in settings.items()]
    return "\n".join(lines) + "\n"


# The two trade-offs a realignment method is judged on, each drawn when its suites ran.
PLOTS = (("domain", PNG_NAME), ("overrefusal", OVERREFUSAL_PNG_NAME))


def _interval(summary: dict | float | None) -> tuple[float, float, float] | None:
    if summary is None:
        return None
    if isinstance(summary, dict):
        return summary["mean"], summary.get("lo", summary["mean"]), summary.get("hi", summary["mean"])
    return float(summary), float(summary), float(summary)


def axis_value(entry: dict, axis: str) -> tuple[float, float, float, str] | None:
    """(mean, lo, hi, label) of one model on `axis` ("safety", "domain" or "overrefusal"): the
    bootstrap interval where the suite has one (the domain score has one when it is one task's
    accuracy; a mean over tasks has none), None when the suite did not run or is not finite."""
    s = entry.get("suites", {})
    got = None
    if axis == "safety" and "safety" in s:
        if "unsafe" in s["safety"]:
            m, lo, hi = _interval(s["safety"]["unsafe"])
            got = 1.0 - m, 1.0 - hi, 1.0 - lo, "safe answers on harmful prompts (1 - judge unsafe rate)"
        else:
            got = (*_interval(s["safety"]["refusal"]), "refusal rate on harmful prompts")
    elif axis == "domain" and "domain" in s:
        tasks = list(s["domain"].get("tasks", {}).values())
        one = _interval(tasks[0]["accuracy"]) if len(tasks) == 1 else _interval(s["domain"]["score"])
        got = (*one, "domain score (mean accuracy)")
    elif axis == "overrefusal" and "overrefusal" in s:
        got = (*_interval(s["overrefusal"]["compliance"]), overrefusal_column(s["overrefusal"]).removesuffix(" ↑"))
    if got is None or not all(math.isfinite(v) for v in got[:3]):
        return None
    return got


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates (at least as high on both axes, higher on
    one): the models a user could rationally pick when both axes are "more is better"."""
    return [i for i, (x, y) in enumerate(points)
            if not any(u >= x and v >= y and (u > x or v > y) for u, v in points)]


def fronts(report: dict) -> dict[str, list[str]]:
    """{x axis: the names on the safety-vs-x Pareto front, by x}, for each plot that has points."""
    out = {}
    for axis, _ in PLOTS:
        pts = _points(report, axis)
        if pts:
            front = sorted(pareto_front([(x[0], y[0]) for _, x, y in pts]), key=lambda i: pts[i][1][0])
            out[axis] = [pts[i][0] for i in front]
    return out


def _points(report: dict, axis: str) -> list:
    points = []
    for m in report["models"]:
        x, y = axis_value(m, axis), axis_value(m, "safety")
        if x is not None and y is not None:
            points.append((m["name"], x, y))
    return points


def _label_offsets(xy_px: list[tuple[float, float]], size: float) -> list[tuple[float, float]]:
    """An offset (points) for each marker's number, chosen greedily so numbers do not sit on one
    another or on other markers when points coincide or crowd."""
    ring = [(dx, dy) for r in (1.0, 2.0, 3.0) for dx, dy in
            ((r, r), (r, -r), (-r, r), (-r, -r), (0, 1.4 * r), (0, -1.4 * r), (1.4 * r, 0), (-1.4 * r, 0))]
    placed: list[tuple[float, float]] = []
    offsets = []
    for x, y in xy_px:
        def clash(c):
            cx, cy = x + c[0] * size, y + c[1] * size
            return sum(abs(cx - px) < size and abs(cy - py) < size for px, py in placed + xy_px)
        best = min(ring, key=clash)
        placed.append((x + best[0] * size, y + best[1] * size))
        offsets.append((best[0] * size, best[1] * size))
    return offsets


def scatter(report: dict, path: str | Path, x_axis: str | None = None) -> bool:
    """Safety against `x_axis` ("domain" or "overrefusal"; default: domain where it ran, else
    over-refusal) as a PNG: each model's point with its bootstrap intervals as error bars, the
    Pareto front as a line, markers numbered and named in a key beside the plot (names printed at
    the points overlap where points coincide). False, and no file, when nothing can be drawn."""
    if x_axis is None:
        x_axis = "domain" if _points(report, "domain") else "overrefusal"
    points = _points(report, x_axis)
    if not points:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    front = set(pareto_front([(x[0], y[0]) for _, x, y in points]))
    fig, (ax, key) = plt.subplots(1, 2, figsize=(10, 5), dpi=120, gridspec_kw={"width_ratios": [3, 2]})
    try:
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.02)
        for i, (_, (x, xlo, xhi, _), (y, ylo, yhi, _)) in enumerate(points):
            color = "C3" if i in front else "C0"
            ax.errorbar([x], [y], xerr=[[x - xlo], [xhi - x]], yerr=[[y - ylo], [yhi - y]], fmt="o", ms=5,
                        color=color, ecolor=color, elinewidth=0.8, alpha=0.85, capsize=2)
        line = sorted(((points[i][1][0], points[i][2][0]) for i in front))
        ax.plot([p[0] for p in line], [p[1] for p in line], "-", color="C3", lw=1.2, label="Pareto front")
        fig.canvas.draw()
        px = [tuple(ax.transData.transform((x[0], y[0]))) for _, x, y in points]
        pt_per_px = 72.0 / fig.dpi
        for i, (off, (_, x, y)) in enumerate(zip(_label_offsets(px, 9 / pt_per_px), points)):
            ax.annotate(str(i + 1), (x[0], y[0]), textcoords="offset points", fontsize=7,
                        xytext=(off[0] * pt_per_px, off[1] * pt_per_px), ha="center", va="center")
        ax.set_xlabel(points[0][1][3])
        ax.set_ylabel(points[0][2][3])
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left", fontsize=7)
        ax.set_title("safety vs " + ("domain" if x_axis == "domain" else "over-refusal") + " (95% intervals)",
                     fontsize=10)
        key.axis("off")
        rows = [f"{'*' if i in front else ' '}{i + 1:>2}  {name[:38]}  ({x[0]:.2f}, {y[0]:.2f})"
                for i, (name, x, y) in enumerate(points)]
        key.text(0.0, 1.0, "\n".join(["* on the Pareto front", ""] + rows), va="top", ha="left",
                 family="monospace", fontsize=max(5, min(8, 360 // max(len(rows), 1))), transform=key.transAxes)
        fig.tight_layout()
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)
    return True


def write_report(report: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write the JSON, Markdown and (when there is something to plot) PNG into `out_dir`."""
    out_dir = Path(out_dir)
    files = {"json": out_dir / JSON_NAME, "markdown": out_dir / MARKDOWN_NAME}
    files["json"].write_text(json.dumps(report, indent=1, ensure_ascii=False, allow_nan=True) + "\n",
                             encoding="utf-8")
    files["markdown"].write_text(markdown(report), encoding="utf-8")
    for axis, name in PLOTS:
        if scatter(report, out_dir / name, axis):
            files["png" if axis == "domain" else "png_overrefusal"] = out_dir / name
    return files
