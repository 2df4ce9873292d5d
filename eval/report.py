"""Evaluation reports: one JSON with every number and generation, a Markdown table, a PNG scatter.

The report dict (what `jmerge eval` builds and `write_report` writes):

    {"created": ISO time, "settings": {...},
     "models": [{"name": ..., "path": ..., "suites": {"safety": ..., "overrefusal": ...,
                                                     "domain": ...}}]}

Each suite entry is what `jmerge.eval.suites` returns for it. `headline` pulls the few numbers
a table row shows. The scatter puts each model at (domain score, safety); without a domain
suite the x axis is XSTest compliance instead, and without either no PNG is drawn.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

JSON_NAME, MARKDOWN_NAME, PNG_NAME = "report.json", "report.md", "safety_vs_domain.png"


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


def safety_score(entry: dict) -> tuple[float, str] | None:
    """The y of the scatter: 1 - unsafe rate with a judge, else the refusal rate."""
    s = entry.get("suites", {}).get("safety")
    if s is None:
        return None
    if "unsafe" in s:
        return 1.0 - s["unsafe"]["mean"], "safe answers on harmful prompts (1 - judge unsafe rate)"
    return s["refusal"]["mean"], "refusal rate on harmful prompts"


def x_score(entry: dict) -> tuple[float, str] | None:
    s = entry.get("suites", {})
    if "domain" in s:
        return s["domain"]["score"], "domain score (mean accuracy)"
    if "overrefusal" in s:
        return s["overrefusal"]["compliance"]["mean"], overrefusal_column(s["overrefusal"]).removesuffix(" ↑")
    return None


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
    for suite, key, what in (("safety", "refusal_by_category", "Safety refusal rate"),
                             ("overrefusal", "compliance_by_category",
                              next((overrefusal_column(m["suites"]["overrefusal"]).removesuffix(" ↑")
                                    for m in models if "overrefusal" in m["suites"]), ""))):
        cats = list(dict.fromkeys(c for m in models for c in m["suites"].get(suite, {}).get(key, {})))
        if len(cats) > 1:
            lines += ["", f"## {what} by category", ""]
            lines += _table(["model"] + cats, [[m["name"]] + [
                _cell(m["suites"].get(suite, {}).get(key, {}).get(c)) for c in cats] for m in models])
    settings = report.get("settings")
    if settings:
        lines += ["", "## Settings", ""] + [f"- {k}: `{v}`" for k, v in settings.items()]
    return "\n".join(lines) + "\n"


def scatter(report: dict, path: str | Path) -> bool:
    """Safety vs domain (or XSTest compliance) per model as a PNG; False when there is no pair."""
    points = []
    for m in report["models"]:
        y, x = safety_score(m), x_score(m)
        if y is not None and x is not None and math.isfinite(x[0]) and math.isfinite(y[0]):
            points.append((m["name"], x, y))
    if not points:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    try:
        for name, (x, _), (y, _) in points:
            ax.scatter([x], [y], s=40)
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
        ax.set_xlabel(points[0][1][1])
        ax.set_ylabel(points[0][2][1])
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.set_title("jmerge eval: safety vs " + ("domain" if "domain" in points[0][1][1] else "over-refusal"))
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
    if scatter(report, out_dir / PNG_NAME):
        files["png"] = out_dir / PNG_NAME
    return files
