"""Preference data and the DPO objective of a search (SOMF trains its masks this way).

Data: JSONL rows {prompt, chosen, rejected}, each answer encoded with the chat template like the
CE pairs (loss on the answer tokens only). A batch holds `batch_size` triples as 2·batch_size rows,
chosen answers first, so one forward pass of the merged model scores both sides; the reference
model's sequence log-probabilities ride along in the batch as `ref_logprob`.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from pathlib import Path
from typing import Iterator

import jax
import numpy as np

from jmerge import data
from jmerge.errors import JmergeError
from jmerge.objectives import dpo_loss, sequence_logprob, token_logprobs


@dataclasses.dataclass(frozen=True)
class Preference:
    chosen: data.Example
    rejected: data.Example


def read_preferences(path: str | Path) -> list[dict]:
    """Rows with a prompt, a chosen and a rejected answer; bad lines reported with their numbers."""
    rows = data.read_pairs(path, response_field="chosen")
    data.read_pairs(path, response_field="rejected")
    return rows


def encode_preferences(tokenizer, rows: list[dict], max_len: int) -> list[Preference]:
    """Both answers encoded and cut to max_len; a triple whose either answer loses every token
    to the cut is dropped (DPO needs both sides)."""
    out, cut = [], 0
    for r in rows:
        pair = []
        for field in ("chosen", "rejected"):
            ex = data.encode_pair(tokenizer, r["prompt"], r[field])
            if len(ex.ids) > max_len:
                cut += 1
                ex = data.Example(ex.ids[:max_len], ex.loss_mask[:max_len])
            pair.append(ex)
        if all(ex.loss_mask.sum() > 0 for ex in pair):
            out.append(Preference(*pair))
    if cut:
        print(f"warning: {cut} of {2 * len(rows)} answers longer than {max_len} tokens were truncated",
              file=sys.stderr)
    if not out:
        raise JmergeError("no preference triple keeps response tokens of both answers within max_len")
    return out


def preference_batches(prefs: list[Preference], batch_size: int, seed: int, pad_id: int = 0) -> Iterator[dict]:
    """Endless full batches of triples: each epoch a permutation drawn from (seed, epoch), so a run
    can be replayed; batches run across epoch ends rather than padding with empty rows, which
    would count in DPO's mean."""
    def order():
        epoch = 0
        while True:
            yield from np.random.default_rng([seed, epoch]).permutation(len(prefs))
            epoch += 1
    it = order()
    while True:
        pick = [prefs[int(next(it))] for _ in range(batch_size)]
        rows = [p.chosen for p in pick] + [p.rejected for p in pick]
        yield data.collate(rows, data.bucket(max(len(r.ids) for r in rows)), 2 * batch_size, pad_id)


@functools.partial(jax.jit, static_argnames=("cfg", "rows"))
def reference_logprobs(params, batch, *, cfg, rows=None):
    """Summed answer log-probabilities of the fixed reference model per row (of the last `rows`
    rows: a batch padded for the mesh carries its padding before its triples)."""
    lp = sequence_logprob(params, cfg, batch)[0]
    return lp if rows is None else lp[-rows:]


def dpo_objective(out, batch, beta: float):
    """DPO of the model that produced `out` (the policy: logits or `Hidden`) against
    `batch['ref_logprob']`."""
    return dpo_term(token_logprobs(out, batch["input_ids"]), batch, beta)


def dpo_term(lp, batch, beta: float):
    """The same from the policy's token log-probabilities [B, T]; the triples are the batch's last
    rows, as many as `ref_logprob` has (chosen answers first)."""
    ref = batch["ref_logprob"]
    seq = (lp * batch["loss_mask"]).sum(axis=1)[-ref.shape[0]:]
    n = ref.shape[0] // 2
    return dpo_loss(seq[:n], seq[n:], ref[:n], ref[n:], beta)
