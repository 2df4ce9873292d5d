"""The output vocabulary (`tokenizer_source` / `tokenizer:`) and each model's embedding rows
rearranged into it, as mergekit does: union or one model's tokenizer, added `tokenizer.tokens`,
padding to a multiple."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from jmerge.engine.inputs import Checked
from jmerge.errors import JmergeError


@dataclasses.dataclass
class TokenizerPlan:
    vocab: dict[str, int]  # output token -> id
    rows: int  # output embedding rows
    perms: dict[str, np.ndarray]  # model -> source row per output row (-1: the model lacks it)
    save: Any  # callable(out_dir)
    changed: bool  # whether any model's embedding rows must be rearranged
    vocabs: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)  # each model's own
    tokens: dict = dataclasses.field(default_factory=dict)  # plan.tokens: token -> TokenSource


def plan_tokenizer(c: Checked) -> TokenizerPlan | None:
    plan = c.plan
    if plan.tokenizer_source is None:
        return None
    vocabs = {ref: m.vocab() for ref, m in c.models.items()}
    if plan.tokenizer_source == "union":
        from transformers import AutoTokenizer
        first = plan.base_model or c.ref_model
        tok = AutoTokenizer.from_pretrained(str(c.models[first].tokenizer_dir))
        have = set(tok.get_vocab())
        extra = [t for ref in c.models for t, _ in sorted(vocabs[ref].items(), key=lambda kv: kv[1])
                 if t not in have]
        # tokenizer.tokens names tokens the output must have: mergekit adds them after the union
        extra = list(dict.fromkeys(extra + [t for t in plan.tokens if t not in have]))
        if extra:
            tok.add_tokens(extra)
        vocab = tok.get_vocab()
        save = lambda out: tok.save_pretrained(str(out))  # noqa: E731
    else:
        src = plan.base_model if plan.tokenizer_source == "base" else plan.tokenizer_source
        vocab = vocabs[src]
        save = c.models[src].write_tokenizer
        new = [t for t in plan.tokens if t not in vocab]
        if new:
            from transformers import AutoTokenizer
            tok = AutoTokenizer.from_pretrained(str(c.models[src].tokenizer_dir))
            tok.add_tokens(new)
            vocab = tok.get_vocab()
            save = lambda out: tok.save_pretrained(str(out))  # noqa: E731
    rows = max(vocab.values()) + 1
    if plan.pad_to_multiple_of:
        rows = -(-rows // plan.pad_to_multiple_of) * plan.pad_to_multiple_of
    perms, changed = {}, False
    for ref, m in c.models.items():
        p = np.full(rows, -1, np.int64)
        for t, i in vocab.items():
            j = vocabs[ref].get(t, -1)
            p[i] = j if j < m.cfg.vocab_size else -1
        perms[ref] = p
        changed |= not (rows == m.cfg.vocab_size and np.array_equal(p, np.arange(rows)))
    return TokenizerPlan(vocab, rows, perms, save, changed or bool(plan.tokens), vocabs, dict(plan.tokens))


def permute_embeddings(arrays: dict[str, np.ndarray], tp: TokenizerPlan, base: str | None) -> dict[str, np.ndarray]:
    """Rearrange each model's embedding rows into the output vocabulary (mergekit semantics):
    a row a model lacks is filled from the only model that has the token, else from the base,
    else with the mean over the models that have it; a token nobody has gets zeros. A token of
    `tokenizer.tokens` takes its source's row instead, where a model lacks it or (`force`) in
    every model. Padding rows (pad_to_multiple_of) get the mean of each model's token rows."""
    refs = list(arrays)
    perms = np.stack([tp.perms[r] for r in refs])  # [models, rows]
    present = perms >= 0
    count = present.sum(0)
    width = next(iter(arrays.values())).shape[1]
    dtype = next(iter(arrays.values())).dtype
    gathered = np.zeros((len(refs), tp.rows, width), np.float32)
    for k, r in enumerate(refs):
        ok = present[k]
        gathered[k, ok] = arrays[r][perms[k, ok]].astype(np.float32)
    fill = np.zeros((tp.rows, width), np.float32)
    mean = gathered.sum(0) / np.maximum(count, 1)[:, None]
    fill[count > 1] = mean[count > 1]
    only = count == 1
    fill[only] = gathered[present.argmax(0)[only], np.nonzero(only)[0]]
    if base is not None and base in refs:
        b = refs.index(base)
        from_base = (count > 1) & present[b]
        fill[from_base] = gathered[b, from_base]
    forced = np.zeros(tp.rows, bool)
    for tok, ts in tp.tokens.items():
        i = tp.vocab[tok]
        if ts.force or not present[:, i].all():
            fill[i] = token_row(tok, ts, i, arrays, tp, [r for k, r in enumerate(refs) if not present[k, i]])
            forced[i] = ts.force
    pad = np.ones(tp.rows, bool)
    pad[list(tp.vocab.values())] = False
    out = {}
    for k, r in enumerate(refs):
        rows = np.where((present[k] & ~forced)[:, None], gathered[k], fill)
        if pad.any():  # as mergekit pads (after Hewitt's vocabulary expansion note)
            rows[pad] = rows[~pad].mean(0)
        out[r] = rows.astype(dtype)
    return out


def token_row(tok: str, ts, i: int, arrays: dict[str, np.ndarray], tp: TokenizerPlan,
              lacking: list[str]) -> np.ndarray:
    """The embedding row `tokenizer.tokens[tok]` names (output row i), as float32."""
    where = f"tokenizer.tokens[{tok!r}]"
    width = next(iter(arrays.values())).shape[1]
    if ts.kind == "zero":
        return np.zeros(width, np.float32)
    if ts.kind is None:
        why = f"{', '.join(lacking)} lack(s) it" if lacking else "force is on"
        raise JmergeError(f"{where} needs a source: {why}")
    if ts.model not in arrays:
        raise JmergeError(f"{where}: source model {ts.model} is not an input of this embedding "
                          f"(inputs: {', '.join(arrays)})")
    src = arrays[ts.model]
    if ts.kind == "model":
        j = int(tp.perms[ts.model][i])
        if j < 0:
            raise JmergeError(f"{where}: source model {ts.model} has no token {tok!r}")
    elif ts.token_id is not None:
        j = ts.token_id
    else:
        j = (tp.vocabs.get(ts.model) or {}).get(ts.token, -1)
        if j < 0:
            raise JmergeError(f"{where}: {ts.model} has no token {ts.token!r}")
    if not 0 <= j < src.shape[0]:
        raise JmergeError(f"{where}: token id {j} is out of range for {ts.model} ({src.shape[0]} rows)")
    return src[j].astype(np.float32)
