"""Supervised pairs (prompt -> response) as chat-formatted token arrays with response-only loss
masks, and length-bucketed batches so few shapes compile."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Iterator

import numpy as np

from jmerge.errors import JmergeError


@dataclasses.dataclass(frozen=True)
class Example:
    ids: np.ndarray  # int32 [n]
    loss_mask: np.ndarray  # int32 [n]: 1 where the token is a response target


def read_pairs(path: str | Path, prompt_field="prompt", response_field="response") -> list[dict]:
    """JSONL records with a prompt and a response; every bad line reported at once, by number."""
    from jmerge.io.files import read_bytes
    path = Path(path)
    rows, problems = [], []
    # Split on bytes: a line that is not UTF-8 is reported alone, and U+2028 inside a JSON string
    # (legal JSON) does not end its line as str.splitlines would.
    for i, raw in enumerate(read_bytes(path, "data file").splitlines(), 1):
        try:
            line = raw.decode("utf-8-sig" if i == 1 else "utf-8")
        except UnicodeDecodeError as e:
            problems.append(f"line {i}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})")
            continue
        if not line.strip():
            continue
        try:
            r = json.loads(line, parse_constant=_not_json)
        except json.JSONDecodeError as e:
            problems.append(f"line {i}: not JSON ({e.msg} at column {e.colno})")
            continue
        except ValueError as e:
            problems.append(f"line {i}: not JSON ({e})")
            continue
        if not isinstance(r, dict):
            problems.append(f"line {i}: not an object (a JSON {_JSON_KINDS.get(type(r), type(r).__name__)})")
            continue
        bad = [_field_problem(r, f) for f in (prompt_field, response_field)]
        if any(bad):
            problems.append(f"line {i}: " + ", ".join(b for b in bad if b))
        else:
            rows.append(r)
    if problems:
        raise JmergeError(f"{path}: " + "; ".join(problems[:5]) + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""))
    if not rows:
        raise JmergeError(f"{path}: no records (expected one JSON object per line with {prompt_field!r} and "
                          f"{response_field!r})")
    return rows


_JSON_KINDS = {list: "array", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}


def _not_json(name: str):
    # Python's json reads NaN and Infinity, which are not JSON.
    raise ValueError(f"{name} is not valid JSON")


def _field_problem(row: dict, name: str) -> str | None:
    v = row.get(name)
    if v is None or isinstance(v, str) and not v.strip():
        return f"missing {name!r}"
    if not isinstance(v, str):
        return f"{name!r} must be a string, got {json.dumps(v)[:40]}"
    return None


def encode_pair(tokenizer, prompt: str, response: str) -> Example:
    """Chat template applied; the loss covers the assistant turn (incl. its end token) only."""
    user = [{"role": "user", "content": prompt}]
    head = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": response}], tokenize=False)
    if not full.startswith(head):  # templates that rewrite earlier turns: fall back to plain concat
        full = head + response + (tokenizer.eos_token or "")
    head_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
    ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    mask = np.zeros(len(ids), np.int32)
    mask[len(head_ids):] = 1
    return Example(np.asarray(ids, np.int32), mask)


def encode_pairs(tokenizer, rows: list[dict], max_len: int, prompt_field="prompt",
                 response_field="response") -> list[Example]:
    """Encode, truncating examples longer than max_len (counted and reported once)."""
    out, cut = [], 0
    for r in rows:
        ex = encode_pair(tokenizer, r[prompt_field], r[response_field])
        if len(ex.ids) > max_len:
            cut += 1
            ex = Example(ex.ids[:max_len], ex.loss_mask[:max_len])
        if ex.loss_mask.sum() > 0:
            out.append(ex)
    if cut:
        print(f"warning: {cut} of {len(rows)} examples longer than {max_len} tokens were truncated",
              file=sys.stderr)
    if not out:
        raise JmergeError("no example keeps any response token within max_len")
    return out


def bucket(n: int, multiple: int = 32) -> int:
    return -(-n // multiple) * multiple


def batches(examples: list[Example], batch_size: int, seed: int, epoch: int, pad_id: int = 0,
            multiple: int = 32) -> Iterator[dict]:
    """Shuffled (deterministically per seed and epoch) batches, right-padded to a bucket length.
    Examples are grouped by bucket first so padding stays small."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(examples))
    by_bucket: dict[int, list[int]] = {}
    for i in order:
        by_bucket.setdefault(bucket(len(examples[i].ids), multiple), []).append(int(i))
    chunks = []
    for length, idx in sorted(by_bucket.items()):
        chunks += [(length, idx[k:k + batch_size]) for k in range(0, len(idx), batch_size)]
    for j in rng.permutation(len(chunks)):
        length, idx = chunks[j]
        yield collate([examples[i] for i in idx], length, batch_size, pad_id)


def endless_batches(examples: list[Example], batch_size: int, seed: int, pad_id: int = 0) -> Iterator[dict]:
    """`batches` epoch after epoch; epoch e is shuffled by (seed, e), so a run can be replayed."""
    epoch = 0
    while True:
        yield from batches(examples, batch_size, seed, epoch, pad_id)
        epoch += 1


def collate(exs: list[Example], length: int, batch_size: int, pad_id: int = 0) -> dict:
    """Fixed [batch_size, length] arrays; missing rows are all padding (mask 0, no loss)."""
    ids = np.full((batch_size, length), pad_id, np.int32)
    attn = np.zeros((batch_size, length), np.int32)
    loss = np.zeros((batch_size, length), np.int32)
    for r, ex in enumerate(exs):
        n = len(ex.ids)
        ids[r, :n], attn[r, :n], loss[r, :n] = ex.ids, 1, ex.loss_mask
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss}
