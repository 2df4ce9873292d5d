"""Throughput of the refusal judges on the 900 labelled XSTest completions, in one run.

Prints answers/s of each judge, its ratio to the keyword judge measured in the same process, and
its agreement with the human labels. The classifier's time excludes loading its model but
includes compiling (first call) unless --warmup is given.

    .venv/bin/python scripts/bench_judge.py [--data DIR] [--judges keyword,classifier] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from jmerge.eval import judges as J  # noqa: E402
from jmerge.eval import refusal_classifier as RC  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.environ.get("JMERGE_DATA") or str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--judges", default="keyword,classifier")
    ap.add_argument("--repeat", type=int, default=3, help="runs of the keyword judge (best is kept)")
    ap.add_argument("--warmup", action="store_true", help="compile the classifier before timing it")
    a = ap.parse_args(argv)

    sets = [RC.load_labeled(Path(a.data), m) for m in RC.XSTEST_LABELED]
    prompts = [p for s in sets for p in s.prompts]
    answers = [t for s in sets for t in s.answers]
    y = np.concatenate([s.y for s in sets])
    rows = {}
    for name in a.judges.split(","):
        t0 = time.perf_counter()
        judge = J.refusal_judge(name)
        load = time.perf_counter() - t0
        if a.warmup and name != "keyword":
            judge(prompts[:RC.BATCH], answers[:RC.BATCH])
        best = float("inf")
        for _ in range(a.repeat if name == "keyword" else 1):
            t0 = time.perf_counter()
            scores = judge.scores(prompts, answers) if name == "lm" else None
            pred = judge(prompts, answers) if scores is None else scores > judge.threshold
            best = min(best, time.perf_counter() - t0)
        rows[name] = (len(answers) / best, load, RC.agreement(pred, y)["agreement"])
        if name == "lm":
            held_out(judge, sets, np.split(scores, np.cumsum([len(s.y) for s in sets])[:-1]))
    base = rows.get("keyword", (None,))[0]
    print(f"{len(answers)} answers; cores: {os.cpu_count()}; agreement is in-sample for the classifier "
          "(its head was trained on these rows: see scripts/train_judge.py for held-out numbers)")
    print(f"{'judge':<12}{'answers/s':>12}{'vs keyword':>12}{'load s':>9}{'agreement':>11}")
    for name, (rate, load, agr) in rows.items():
        ratio = f"{rate / base:.2e}" if base else "-"
        print(f"{name:<12}{rate:>12.1f}{ratio:>12}{load:>9.1f}{agr:>11.3f}")


def held_out(judge, sets, scores) -> None:
    """The prompted judge's cut fitted on one labelled file, its agreement on the other."""
    from jmerge.eval.refusal_lm import best_threshold
    for i, tune in enumerate(sets):
        cut = best_threshold(scores[i], tune.y)
        for j, test in enumerate(sets):
            a = RC.agreement(scores[j] > cut, test.y)
            print(f"lm judge, cut {cut:+.3f} fitted on {tune.model}: {test.model} agreement {a['agreement']:.3f} "
                  f"confusion {a['confusion']}" + (" (in-sample)" if i == j else " (held out)"))
    for s, sc in zip(sets, scores):
        a = RC.agreement(sc > judge.threshold, s.y)
        print(f"lm judge, shipped cut {judge.threshold:+.3f}: {s.model} agreement {a['agreement']:.3f} {a['confusion']}")


if __name__ == "__main__":
    main()
