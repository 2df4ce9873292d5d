"""Losses over the params pytree: response-only cross-entropy and DPO.

A batch is a dict of arrays: `input_ids` [B, T], `attention_mask` [B, T] and `loss_mask` [B, T],
where loss_mask[b, t] = 1 when token t is a target (a response token, predicted from t - 1).

A model's output reaches the losses either as logits [B, T, V] or as `Hidden`: the final-normed
hidden states and the head weight, projected a slice of the vocabulary at a time
(`target_logprobs`) so that the float32 [B, T, V] logits of a long batch with a large vocabulary
never exist, in the forward pass or the backward.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jmerge.config import ModelConfig
from jmerge.models import llama


class Hidden(NamedTuple):
    states: jax.Array  # [B, T, D], final-normed
    head: jax.Array  # [V, D]: lm_head, or the embedding when tied


# Float32 logits of one vocabulary slice for the whole batch (all devices together): 256 MiB
# (the backward pass holds about three such buffers).
SLICE_ELEMENTS = 1 << 26


def target_logprobs(states, head, targets, slices: int | None = None):
    """log softmax(states @ head.T)[target] [B, T] in float32 from states [B, T, D], head [V, D]
    and targets [B, T], with the vocabulary cut into `slices` strided slices (rows j, j + n, ...
    of the head; default: as many as keep one slice's logits within SLICE_ELEMENTS). Strided, so
    a head split over devices by vocabulary rows stays split the same way in every slice."""
    tokens, vocab = targets.size, head.shape[0]
    n = slices or max(1, min(vocab, -(-tokens * vocab // SLICE_ELEMENTS)))
    return _sliced_logprobs(states, head, targets.astype(jnp.int32), n)


def _strided(head, n):
    """[c, n, D] with [i, j] = head row i * n + j (zero rows past the vocabulary)."""
    vocab, d = head.shape
    c = -(-vocab // n)
    if c * n != vocab:
        head = jnp.pad(head, ((0, c * n - vocab), (0, 0)))
    return head.reshape(c, n, d)


def _slice_logits(states, w, j, vocab):
    """Float32 logits [B, T, c] of slice j; columns past the vocabulary are -inf."""
    c, n, _ = w.shape
    z = jnp.einsum("btd,cd->btc", states, loop_index(w, j, 1), preferred_element_type=jnp.float32)
    if c * n != vocab:
        z = jnp.where(jnp.arange(c) * n + j < vocab, z, -jnp.inf)
    return z


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _sliced_logprobs(states, head, targets, n):
    return _sliced_forward(states, head, targets, n)[0]


def _sliced_forward(states, head, targets, n):
    # An online logsumexp over the slices; each target's logit is picked from the slice holding it.
    w = _strided(head, n)

    def body(j, carry):
        m, s, picked = carry
        z = _slice_logits(states, w, j, head.shape[0])
        m_new = jnp.maximum(m, z.max(-1))
        s = s * jnp.exp(m - m_new) + jnp.exp(z - m_new[..., None]).sum(-1)
        here = jnp.take_along_axis(z, (targets // n)[..., None], axis=-1)[..., 0]
        return m_new, s, jnp.where(targets % n == j, here, picked)

    zeros = jnp.zeros(targets.shape, jnp.float32)
    m, s, picked = jax.lax.fori_loop(0, n, body, (jnp.full(targets.shape, -jnp.inf), zeros, zeros))
    # (picked - max) - log(sum): log_softmax's own order, so one slice gives its bits.
    return (picked - m) - jnp.log(s), (states, head, targets, m + jnp.log(s))


def unsigned(dtype):
    """The unsigned integer type of a dtype's width."""
    return jnp.dtype(f"uint{8 * jnp.dtype(dtype).itemsize}")


def loop_index(tree, i, axis: int = 0):
    """Every leaf's index i along `axis`, inside a loop over i. CPU's XLA cannot slice bfloat16:
    it casts the whole operand to float32 first and hoists that cast out of the loop, a float32
    copy of every slice at once. So the leaves pass a barrier with i (nothing loop-invariant is
    left to hoist) and are sliced as their bits. The same values; free where bfloat16 slices
    natively (GPU, TPU)."""
    tree, i = jax.lax.optimization_barrier((tree, i))

    def one(x):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            return jax.lax.dynamic_index_in_dim(x, i, axis, keepdims=False)
        bits = jax.lax.bitcast_convert_type(x, unsigned(x.dtype))
        return jax.lax.bitcast_convert_type(jax.lax.dynamic_index_in_dim(bits, i, axis, keepdims=False), x.dtype)
    return jax.tree.map(one, tree)


def _sliced_backward(n, res, g):
    # Each slice's logits are recomputed from the saved logsumexp: d lp / d z = onehot - softmax.
    # The head's gradient is whole per slice (no sum across slices), written into its rows as
    # bits, which CPU's XLA updates in place (bfloat16 it would hold in float32); the states'
    # is summed in float32.
    states, head, targets, lse = res
    w = _strided(head, n)
    c = w.shape[0]

    def body(j, carry):
        d_states, d_w = carry
        z = _slice_logits(states, w, j, head.shape[0])
        onehot = (targets % n == j)[..., None] & ((targets // n)[..., None] == jnp.arange(c))
        dz = ((onehot.astype(jnp.float32) - jnp.exp(z - lse[..., None])) * g[..., None]).astype(w.dtype)
        w_j = loop_index(w, j, 1)
        d_states = d_states + jnp.einsum("btc,cd->btd", dz, w_j, preferred_element_type=jnp.float32)
        d_wj = jnp.einsum("btc,btd->cd", dz, states.astype(w.dtype), preferred_element_type=jnp.float32)
        d_wj = jax.lax.bitcast_convert_type(d_wj.astype(w.dtype), unsigned(w.dtype))
        return d_states, jax.lax.dynamic_update_index_in_dim(d_w, d_wj, j, 1)

    zeros = (jnp.zeros(states.shape, jnp.float32), jnp.zeros(w.shape, unsigned(w.dtype)))
    d_states, d_w = jax.lax.fori_loop(0, n, body, zeros)
    d_head = jax.lax.bitcast_convert_type(d_w, w.dtype).reshape(-1, w.shape[-1])[:head.shape[0]]
    return d_states.astype(states.dtype), d_head, None


_sliced_logprobs.defvjp(_sliced_forward, _sliced_backward)


def head_weight(params, cfg: ModelConfig):
    """The vocabulary projection [V, D] of a params pytree."""
    return params["model"]["embed_tokens"]["weight"] if cfg.tie_word_embeddings else params["lm_head"]["weight"]


def hidden(params, cfg: ModelConfig, input_ids, attention_mask=None, **fwd) -> Hidden:
    return Hidden(llama.forward(params, cfg, input_ids, attention_mask, return_hidden=True, **fwd),
                  head_weight(params, cfg))


def token_logprobs(out, input_ids):
    """log p(token t | tokens < t) for t >= 1; position 0 gets 0. Float32 throughout.
    `out`: logits [B, T, V] or `Hidden`."""
    if isinstance(out, Hidden):
        picked = target_logprobs(out.states[:, :-1], out.head, input_ids[:, 1:])
    else:
        logp = jax.nn.log_softmax(out[:, :-1].astype(jnp.float32), axis=-1)
        picked = jnp.take_along_axis(logp, input_ids[:, 1:, None], axis=-1)[..., 0]
    return jnp.pad(picked, ((0, 0), (1, 0)))


def sequence_logprob(params, cfg: ModelConfig, batch, **fwd):
    """Sum of response-token log-probabilities per sequence, and the response lengths."""
    out = hidden(params, cfg, batch["input_ids"], batch["attention_mask"], **fwd)
    lp = token_logprobs(out, batch["input_ids"]) * batch["loss_mask"]
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
