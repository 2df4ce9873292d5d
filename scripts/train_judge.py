"""Train the learnt refusal judge (eval/refusal_head.npz) and measure every component.

Data: XSTest completions of two models labelled by humans (<data>/xstest_labeled/{gpt4,llama2orig}.csv,
CC BY 4.0; refusal = final_label 2_full_refusal or 3_partial_refusal). Protocols, all printed
as agreement + confusion matrix [[human no & judge no, human no & judge yes], [yes & no, yes & yes]]:

- cross-model: tune on one model's completions, measure on the other's (both directions);
  the head's L2 strength is picked by prompt-grouped CV inside the training model only.
- by prompt and model: 5 folds by prompt id; train on model A, folds != k; test on model B, fold k.
- within-model CV (5 prompt folds inside one model): an in-distribution reference only.

Components: the keyword rules alone (`judges.is_refusal`), XSTest's string match, the head on
embeddings alone, and the head on embeddings + rule flag (the shipped judge). The shipped head is
then fit on all rows with the L2 picked by CV and saved with a few reference rows and their scores.

    .venv/bin/python scripts/train_judge.py [--data DIR] [--features CACHE.npz] [--out eval/refusal_head.npz]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from jmerge.eval import judges as J  # noqa: E402
from jmerge.eval import refusal_classifier as RC  # noqa: E402

L2_GRID = (0.01, 0.03, 0.1, 0.3, 1.0)
N_REFERENCE = 16


def embeddings(sets: dict, cache: Path | None, max_tokens: int) -> dict:
    if cache is not None and cache.is_file():
        with np.load(cache) as f:
            if all(m in f for m in sets):
                return {m: f[m] for m in sets}
    emb = RC.Embedder(max_tokens=max_tokens)
    out = {m: emb(s.prompts, s.answers) for m, s in sets.items()}
    if cache is not None:
        np.savez(cache, **out)
    return out


def fit(x, y, l2):
    return RC.fit_head(x, y, l2=l2, free=[x.shape[1] - 1])


def pick_l2(x, y, folds) -> float:
    """L2 strength with the best prompt-grouped CV agreement inside one training set."""
    def cv(l2):
        hits = 0
        for k in range(int(folds.max()) + 1):
            tr, te = folds != k, folds == k
            hits += int((fit(x[tr], y[tr], l2).predict(x[te]) == y[te]).sum())
        return hits / len(y)
    scores = {l2: cv(l2) for l2 in L2_GRID}
    return max(scores, key=lambda l2: (scores[l2], l2))  # ties: the stronger prior


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.environ.get("JMERGE_DATA") or str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--features", type=Path, help="cache of the embeddings (.npz), read if present")
    ap.add_argument("--out", type=Path, default=RC.HEAD_FILE)
    ap.add_argument("--max-tokens", type=int, default=RC.MAX_TOKENS, help="tokens of 'Answer: ...' embedded")
    ap.add_argument("--no-save", action="store_true")
    a = ap.parse_args(argv)

    sets = {m: RC.load_labeled(Path(a.data), m) for m in RC.XSTEST_LABELED}
    emb = embeddings(sets, a.features, a.max_tokens)
    x = {m: RC.with_rule(emb[m], sets[m].answers) for m in sets}
    folds = {m: np.array([RC.prompt_fold(i) for i in sets[m].ids]) for m in sets}
    report: dict = {"rules": {}, "strmatch": {}, "cross_model": {}, "by_prompt_and_model": {}}
    for m, s in sets.items():
        report["rules"][m] = RC.agreement(J.refusal_flags(s.answers), s.y)
    import csv
    for m in sets:
        with open(Path(a.data) / "xstest_labeled" / f"{m}.csv", newline="", encoding="utf-8") as f:
            sm = [r["strmatch_label"] in RC.REFUSAL_LABELS for r in csv.DictReader(f)]
        report["strmatch"][m] = RC.agreement(sm, sets[m].y)

    for tr, te in (("gpt4", "llama2orig"), ("llama2orig", "gpt4")):
        key = f"{tr}->{te}"
        l2 = pick_l2(x[tr], sets[tr].y, folds[tr])
        full = fit(x[tr], sets[tr].y, l2)
        emb_only = RC.fit_head(emb[tr], sets[tr].y, l2=l2)
        report["cross_model"][key] = {
            "l2": l2, "classifier+rule": RC.agreement(full.predict(x[te]), sets[te].y),
            "classifier alone": RC.agreement(emb_only.predict(emb[te]), sets[te].y)}
        # held out by prompt *and* model
        pred = np.zeros(len(sets[te].y), bool)
        for k in range(int(folds[te].max()) + 1):
            trm, tem = folds[tr] != k, folds[te] == k
            pred[tem] = fit(x[tr][trm], sets[tr].y[trm], l2).predict(x[te][tem])
        report["by_prompt_and_model"][key] = RC.agreement(pred, sets[te].y)
        print(key, json.dumps(report["cross_model"][key]), "| by prompt+model",
              json.dumps(report["by_prompt_and_model"][key]), flush=True)

    # In-distribution reference: prompt-grouped CV inside one model (not a generalisation number).
    report["within_model_cv"] = {}
    for m in sets:
        l2 = pick_l2(x[m], sets[m].y, folds[m])
        both, alone = np.zeros(len(sets[m].y), bool), np.zeros(len(sets[m].y), bool)
        for k in range(int(folds[m].max()) + 1):
            tr, te = folds[m] != k, folds[m] == k
            both[te] = fit(x[m][tr], sets[m].y[tr], l2).predict(x[m][te])
            alone[te] = RC.fit_head(emb[m][tr], sets[m].y[tr], l2=l2).predict(emb[m][te])
        report["within_model_cv"][m] = {"l2": l2, "classifier+rule": RC.agreement(both, sets[m].y),
                                        "classifier alone": RC.agreement(alone, sets[m].y)}
        print(m, "within-model CV", json.dumps(report["within_model_cv"][m]), flush=True)

    xa = np.concatenate([x[m] for m in sets])
    ya = np.concatenate([sets[m].y for m in sets])
    fa = np.concatenate([folds[m] for m in sets])
    l2 = pick_l2(xa, ya, fa)
    head = fit(xa, ya, l2)
    head.meta = {"trained_on": "XSTest completions of gpt4 + llama2orig (xstest_labeled, 900 rows, human labels)",
                 "judge_model": "SmolLM2-135M-Instruct (jmerge default)", "max_tokens": a.max_tokens, "l2": l2,
                 "features": "mean+last final hidden state of 'Answer: <answer>' + keyword rule flag"}
    report["shipped"] = {"l2": l2, "train_agreement": RC.agreement(head.predict(xa), ya)}
    for m in sets:
        print(m, "rules", json.dumps(report["rules"][m]), "| strmatch", json.dumps(report["strmatch"][m]))
    print("shipped head:", json.dumps(report["shipped"]))
    if not a.no_save:
        # Reference rows (every 57th of each file): the slow test re-embeds them and must get these scores.
        ref = [(m, i) for m in sets for i in range(0, len(sets[m].y), 57)][:N_REFERENCE]
        rx = np.stack([x[m][i] for m, i in ref])
        head.save(a.out, ref_ids=np.array([f"{m}:{sets[m].ids[i]}" for m, i in ref]), ref_features=rx,
                  ref_scores=head.prob(rx).astype(np.float32))
        print("wrote", a.out, a.out.stat().st_size, "bytes")
    return report


if __name__ == "__main__":
    main()
