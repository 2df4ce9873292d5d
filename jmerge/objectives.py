"""Losses over the params pytree: response-only cross-entropy and DPO.

A batch is a dict of arrays: `input_ids` [B, T], `attention_mask` [B, T] and `loss_mask` [B, T],
where loss_mask[b, t] = 1 when token t is a target (a response token, predicted from t - 1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jmerge.config import ModelConfig
from jmerge.models import llama


def token_logprobs(logits, input_ids):
    """log p(token t | tokens < t) for t >= 1; position 0 gets 0. Float32 throughout."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, input_ids[:, 1:, None], axis=-1)[..., 0]
    return jnp.pad(picked, ((0, 0), (1, 0)))


def sequence_logprob(params, cfg: ModelConfig, batch, **fwd):
    """Sum of response-token log-probabilities per sequence, and the response lengths."""
    logits = llama.forward(params, cfg, batch["input_ids"], batch["attention_mask"], **fwd)
    lp = token_logprobs(logits, batch["input_ids"]) * batch["loss_mask"]
    return lp.sum(axis=1), batch["loss_mask"].sum(axis=1)


def response_ce(params, cfg: ModelConfig, batch, **fwd):
    """(sum of token CE over response tokens, number of response tokens): divide after summing
    over micro-batches so gradient accumulation weighs every token equally."""
    lp, n = sequence_logprob(params, cfg, batch, **fwd)
    return -lp.sum(), n.sum()


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float = 0.1):
    """Direct Preference Optimisation (Rafailov et al. 2023) on summed sequence log-probs."""
    margin = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    return -jnp.mean(jax.nn.log_sigmoid(margin))
