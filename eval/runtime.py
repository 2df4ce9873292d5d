"""The runtime the evaluation suites share: one model *shape* on one mesh.

A `Runtime` holds the config, tokenizer, mesh, one `Generator` and the jitted log-likelihood
scorer. A new params pytree of the same shapes (a merge candidate) swaps in without recompiling
anything, so a search can evaluate many merges in one process.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from jmerge import sharding as shd
from jmerge.errors import JmergeError
from jmerge.generate import Generator, Sampling, bucket_length, default_eos_ids
from jmerge.models import llama
from jmerge.objectives import head_weight

def _tail_logprobs(params, ids, mask, target, *, cfg, k: int):
    """Summed log-prob of the last k tokens of each left-padded row, where target [B, k] is 1.

    Only the last k positions are projected to the vocabulary: a choice is a few tokens and the
    full [B, T, V] logits would dominate memory for long contexts.
    """
    h = llama.forward(params, cfg, ids, mask, return_hidden=True)  # final-normed hidden states
    logits = jnp.einsum("btd,vd->btv", h[:, -k - 1:-1], head_weight(params, cfg), preferred_element_type=jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, ids[:, -k:, None], axis=-1)[..., 0]
    return jnp.sum(picked * target, axis=1)


_tail_logprobs_jit = jax.jit(_tail_logprobs, static_argnames=("cfg", "k"))


def _batch_sharding(mesh, rows: int) -> NamedSharding:
    """A scoring batch's rows over data x fsdp when they divide, else replicated."""
    divides = rows % (mesh.shape["data"] * mesh.shape["fsdp"]) == 0
    return shd.batch_sharding(mesh, 2) if divides else shd.replicated(mesh)


def scoring_program(cfg, params, mesh, rows: int, length: int, k: int = 8) -> jax.stages.Lowered:
    """The scorer `Runtime.score` compiles for a batch of `rows` x bucket(`length`) tokens whose
    continuations are at most k tokens, lowered from abstract params (`jax.ShapeDtypeStruct`s on
    their shardings) for a dry run."""
    length = bucket_length(length)
    k = min(k, length - 1)
    ids = jax.ShapeDtypeStruct((rows, length), jnp.int32, sharding=_batch_sharding(mesh, rows))
    target = jax.ShapeDtypeStruct((rows, k), jnp.float32, sharding=_batch_sharding(mesh, rows))
    return _tail_logprobs_jit.lower(params, ids, ids, target, cfg=cfg, k=k)


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

    def release(self) -> None:
        self.generator.release()

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
        sharding = _batch_sharding(self.mesh, rows)
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
            lp = shd.host_value(lp).astype(np.float64)
            for r, i in enumerate(batch):
                out[i] = lp[r]
        return out
