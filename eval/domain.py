"""The domain suite's items and scoring: multiple-choice log-likelihood and numeric exact match.

- multiple choice: the choice whose continuation has the highest summed log-prob wins;
  `accuracy_norm` divides by the continuation's characters, as lm-eval's acc_norm.
- numeric: exact match of the number parsed from a generated answer.

Multiple choice prompts are raw text, the same for base and chat models (lm-eval style):
``[Abstract|Context]: ...\\nQuestion: ...\\nAnswer:`` + `` <choice>``; the context is cut to
`context_tokens` tokens. Context and continuation are tokenized separately and concatenated,
so every choice scores the same context tokens.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from jmerge.errors import JmergeError
from jmerge.io.files import loads_json, read_text
from jmerge.eval import judges as J
from jmerge.eval.prompts import load_builtin, split_train_test
from jmerge.eval.runtime import Runtime

PUBMEDQA_CHOICES = ("yes", "no", "maybe")
DEFAULT_CONTEXT_TOKENS = 512


# ---------------------------------------------------------------------------------------------
# Items and loading


@dataclasses.dataclass(frozen=True)
class MCItem:
    id: str
    question: str
    choices: tuple[str, ...]
    answer: int  # index into choices
    context: str | None = None
    category: str | None = None
    context_label: str = "Context"


@dataclasses.dataclass(frozen=True)
class NumericItem:
    id: str
    question: str
    answer: float
    category: str | None = None


@dataclasses.dataclass(frozen=True)
class DomainTask:
    name: str
    kind: str  # "mc" | "numeric"
    items: tuple


def _records(path: Path) -> list[tuple[str, dict]]:
    if not path.exists():
        raise JmergeError(f"domain file not found: {path}")
    text = read_text(path, "domain file")
    recs = []
    if path.suffix.lower() == ".jsonl":
        for i, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                recs.append((str(i), loads_json(line, path, f"line {i}", kind=None)))
    elif path.suffix.lower() == ".json":
        data = loads_json(text, path, "domain file", kind=None) if text.strip() else []
        if not isinstance(data, list):
            raise JmergeError(f"{path}: expected a JSON list of records")
        recs = [(str(i), r) for i, r in enumerate(data, start=1)]
    else:
        raise JmergeError(f"{path}: a domain file is .jsonl (or a .json list) of records")
    if not recs:
        raise JmergeError(f"no records in {path} (file is empty)")
    for key, r in recs:
        if not isinstance(r, dict):
            raise JmergeError(f"{path}: record {key} is {type(r).__name__}, expected an object")
    return recs


def _field(path, key, rec, name):
    if name not in rec:
        raise JmergeError(f"{path}: record {key} has no field {name!r}; available fields: "
                          f"{', '.join(map(repr, rec)) or 'none'}")
    return rec[name]


def _choice_index(path, key, choices, answer) -> int:
    if isinstance(answer, bool):
        answer = str(answer).lower()
    if isinstance(answer, int):
        if 0 <= answer < len(choices):
            return answer
        raise JmergeError(f"{path}: record {key} answer index {answer} is outside its {len(choices)} choices")
    if isinstance(answer, str):
        if answer in choices:
            return choices.index(answer)
        folded = [c.strip().casefold() for c in choices]
        if answer.strip().casefold() in folded:
            return folded.index(answer.strip().casefold())
        if len(answer.strip()) == 1 and answer.strip().isalpha():  # "B" = the second choice
            i = ord(answer.strip().upper()) - ord("A")
            if 0 <= i < len(choices):
                return i
    raise JmergeError(f"{path}: record {key} answer {answer!r} is neither a choice, its index, nor its letter")


def load_domain_file(path: str | Path) -> DomainTask:
    """JSONL with question/choices/answer (multiple choice) or question/answer (numeric)."""
    path = Path(path)
    recs = _records(path)
    kind = "mc" if "choices" in recs[0][1] else "numeric"
    items = []
    for key, r in recs:
        question = _field(path, key, r, "question")
        if not isinstance(question, str) or not question.strip():
            raise JmergeError(f"{path}: record {key} field 'question' must be non-empty text")
        cat = r.get("category")
        cat = None if cat is None else str(cat)
        rid = f"{path.stem}:{r.get('id', key)}"
        if kind == "mc":
            choices = _field(path, key, r, "choices")
            if not isinstance(choices, list) or len(choices) < 2 or not all(
                    isinstance(c, str) and c.strip() for c in choices):
                raise JmergeError(f"{path}: record {key} field 'choices' must list at least two non-empty texts")
            answer = _choice_index(path, key, choices, _field(path, key, r, "answer"))
            ctx = r.get("context")
            items.append(MCItem(rid, question.strip(), tuple(choices), answer,
                                ctx if isinstance(ctx, str) and ctx.strip() else None, cat))
        else:
            raw = _field(path, key, r, "answer")
            gold = raw if isinstance(raw, (int, float)) and not isinstance(raw, bool) else parse_number(str(raw))
            if gold is None or not math.isfinite(gold):
                raise JmergeError(f"{path}: record {key} answer {raw!r} is not a number")
            items.append(NumericItem(rid, question.strip(), float(gold), cat))
    return DomainTask(path.stem, kind, tuple(items))


def pubmedqa_task(data: str | Path | None = None, split: str = "test") -> DomainTask:
    """PubMedQA-L as yes/no/maybe multiple choice; by default its hash test split only, so a
    domain expert trained on the train side is never scored on what it saw."""
    prompts = load_builtin("pubmedqa", data)
    if split == "test":
        prompts = split_train_test(prompts)[1]
    elif split != "all":
        raise JmergeError(f"PubMedQA split must be 'test' or 'all', got {split!r}")
    items = []
    for p in prompts:
        if p.answer not in PUBMEDQA_CHOICES:
            raise JmergeError(f"{p.id}: answer {p.answer!r} is not yes/no/maybe")
        items.append(MCItem(p.id, p.question, PUBMEDQA_CHOICES, PUBMEDQA_CHOICES.index(p.answer),
                            p.context, f"gold={p.answer}", "Abstract"))
    return DomainTask("pubmedqa", "mc", tuple(items))


def load_domain(spec: str | Path, data: str | Path | None = None) -> DomainTask:
    """'pubmedqa' (from `data` / $JMERGE_DATA) or a JSONL file."""
    if str(spec) == "pubmedqa" and not Path(spec).exists():
        return pubmedqa_task(data)
    return load_domain_file(spec)


# ---------------------------------------------------------------------------------------------
# Domain scoring


def truncate_tokens(tokenizer, text: str, budget: int) -> str:
    """The first `budget` tokens of `text`, decoded back to text."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= budget:
        return text
    return tokenizer.decode(ids[:budget], skip_special_tokens=True)


def mc_context(item: MCItem, tokenizer=None, context_tokens: int | None = DEFAULT_CONTEXT_TOKENS) -> str:
    head = ""
    if item.context:
        ctx = item.context
        if tokenizer is not None and context_tokens is not None:
            ctx = truncate_tokens(tokenizer, ctx, context_tokens)
        head = f"{item.context_label}: {ctx}\n"
    return f"{head}Question: {item.question}\nAnswer:"


def multiple_choice(params, rt: Runtime, items: Sequence[MCItem], *,
                    context_tokens: int | None = DEFAULT_CONTEXT_TOKENS, n_boot: int = 1000,
                    seed: int = 0) -> dict:
    if not items:
        raise JmergeError("multiple choice: no items to evaluate")
    if context_tokens is not None and context_tokens <= 0:
        raise JmergeError(f"context token budget must be > 0, got {context_tokens}")
    tok = rt.tokenizer
    pairs, owner = [], []
    for n, item in enumerate(items):
        ctx = list(tok(mc_context(item, tok, context_tokens), add_special_tokens=True)["input_ids"])
        for choice in item.choices:
            cont = list(tok(" " + choice.strip(), add_special_tokens=False)["input_ids"])
            pairs.append((ctx, cont))
            owner.append(n)
    lp = rt.score(params, pairs)
    correct, correct_norm, recs, at = [], [], [], 0
    for item in items:
        scores = lp[at:at + len(item.choices)]
        at += len(item.choices)
        norm = scores / np.array([len(" " + c.strip()) for c in item.choices])
        pick, pick_norm = int(np.argmax(scores)), int(np.argmax(norm))
        correct.append(pick == item.answer)
        correct_norm.append(pick_norm == item.answer)
        recs.append(dict(id=item.id, answer=item.choices[item.answer], pred=item.choices[pick],
                         logprobs=[float(s) for s in scores], correct=bool(pick == item.answer)))
    cats = [i.category for i in items]
    return dict(kind="mc", n=len(items), accuracy=J.summarize(correct, n_boot, seed),
                accuracy_norm=J.summarize(correct_norm, n_boot, seed),
                accuracy_by_category=J.by_category(correct, cats, n_boot, seed), items=recs)


_NUM = r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+"
_NUMBER = re.compile(_NUM)
_MARKERS = (re.compile(r"####"), re.compile(r"\\boxed\{"),
            re.compile(r"answer(?:\s+is|\s*:|\s+would\s+be)", re.IGNORECASE))


def parse_number(text: str) -> float | None:
    """The answer number in a response: after the last '####' (GSM8K), else inside the last
    \\boxed{}, else after the last 'answer is' / 'answer:', else the last number in the text.
    Thousands separators, a leading '$' and a trailing '%' are ignored."""
    text = text.replace("$", "")
    for marker in _MARKERS:
        hits = list(marker.finditer(text))
        if hits:
            m = _NUMBER.search(text, hits[-1].end())
            if m:
                return float(m.group().replace(",", ""))
    found = _NUMBER.findall(text)
    return float(found[-1].replace(",", "")) if found else None


def numbers_match(pred: float | None, gold: float, rel_tol: float = 1e-4, abs_tol: float = 1e-6) -> bool:
    return pred is not None and math.isclose(pred, gold, rel_tol=rel_tol, abs_tol=abs_tol)


def numeric_exact_match(params, rt: Runtime, items: Sequence[NumericItem], *, rel_tol: float = 1e-4,
                        abs_tol: float = 1e-6, n_boot: int = 1000, seed: int = 0) -> dict:
    if not items:
        raise JmergeError("exact match: no items to evaluate")
    completions = rt.generate(params, [i.question for i in items])
    correct, recs = [], []
    for item, c in zip(items, completions):
        pred = parse_number(c.response)
        ok = numbers_match(pred, item.answer, rel_tol, abs_tol)
        correct.append(ok)
        recs.append(dict(id=item.id, prompt=item.question, response=c.response, answer=item.answer,
                         pred=pred, correct=ok, finish_reason=c.finish_reason))
    return dict(kind="numeric", n=len(items), accuracy=J.summarize(correct, n_boot, seed),
                accuracy_by_category=J.by_category(correct, [i.category for i in items], n_boot, seed),
                items=recs)
