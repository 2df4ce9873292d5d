"""Attention over cache slots without a [T, S] score matrix.

Queries occupy slots [start, start + T), keys slots [0, S). A query sees a key when the key's slot
is not later than its own, lies inside the sliding window (`window` > 0: fewer than `window` slots
back) and is real in `key_mask` [B, S]. Scores of hidden keys are float32's lowest finite value, as
the dense formula always had: a row that sees no key (a left-pad query) then averages the values it
visits instead of dividing by zero, and no NaN reaches the real rows.

Long sequences run flash-style: query blocks, and for each a loop over just the key blocks its
slots can see, with an online softmax in float32; the backward (a custom VJP) recomputes each
block's probabilities from the saved row max and sum, so neither pass holds more than one block of
scores. Up to one block each way the dense formula is used, bit for bit what it was before.

On GPUs with bf16/fp16 inputs and no cache, cuDNN's fused kernel takes over when the key mask is a
prefix (right padding), the only padding it expresses without an O(T * S) bias. Pallas splash
attention is not used on TPU: it takes masks as static arrays and needs shard_map around the
GSPMD-sharded model, which this module does not own.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

MASKED = float(jnp.finfo(jnp.float32).min)
BLOCK = 512


def attention(q, k, v, *, start, window, key_mask, scale, block: int | None = None):
    """q [B, T, H, D], k / v [B, S, Hkv, D] (H a multiple of Hkv), key_mask [B, S] -> [B, T, H, D]
    in v's dtype. start and window are ints or traced int32 scalars; a Python int window lets the
    GPU kernel take it. block: the tile size, BLOCK (read at call time) when None."""
    block = block or BLOCK
    portable = functools.partial(_portable, q, k, v, start, window, key_mask, scale, block)
    if use_cudnn(q, q.shape[1], k.shape[1], start, window):
        return _cudnn(q, k, v, key_mask, window, scale, portable)
    return portable()


def _portable(q, k, v, start, window, key_mask, scale, block):
    b, t, h, d = q.shape
    s, kv = k.shape[1], k.shape[2]
    q = q.reshape(b, t, kv, h // kv, d)
    k = k.astype(q.dtype)
    if t <= block and s <= block:
        out = dense(q, k, v, start, window, key_mask, scale)
    else:
        out = _blocked(q, k, v, start, window, key_mask, scale, block)
    return out.reshape(b, t, h, d)


def allowed(q_slot, k_slot, window, key_mask):
    """[B, Tq, Sk] bool: which keys each query sees. q_slot [Tq], k_slot [Sk], key_mask [B, Sk]."""
    q_slot, k_slot = q_slot[:, None], k_slot[None, :]
    ok = (k_slot <= q_slot) & ((window == 0) | (q_slot - k_slot < window))
    return ok[None] & key_mask[:, None, :].astype(bool)


def dense(q, k, v, start, window, key_mask, scale):
    """The reference formula, grouped: q [B, T, Hkv, G, D] -> [B, T, Hkv, G, D]."""
    t, s = q.shape[1], k.shape[1]
    mask = allowed(start + jnp.arange(t), jnp.arange(s), window, key_mask)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores * scale
    scores = jnp.where(mask[:, None, None], scores, MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v)


def block_size(n: int, block: int) -> int:
    """n itself up to `block`; else a multiple of 8 in [block / 2, block] dividing n (no padding),
    else `block` (n is padded)."""
    if n <= block:
        return n
    return next((c for c in range(block, block // 2 - 1, -8) if n % c == 0), block)


def _blocked(q, k, v, start, window, key_mask, scale, block):
    t, s = q.shape[1], k.shape[1]
    bq, bk = block_size(t, block), block_size(s, block)
    tp, sp = -(-t // bq) * bq, -(-s // bk) * bk
    # Padded keys are hidden; padded query rows get no cotangent because their output is cut off.
    q = jnp.pad(q, ((0, 0), (0, tp - t), (0, 0), (0, 0), (0, 0)))
    k = jnp.pad(k, ((0, 0), (0, sp - s), (0, 0), (0, 0)))
    v = jnp.pad(v, ((0, 0), (0, sp - s), (0, 0), (0, 0)))
    key_mask = jnp.pad(key_mask.astype(jnp.int32), ((0, 0), (0, sp - s)))
    start, window = jnp.asarray(start, jnp.int32), jnp.asarray(window, jnp.int32)
    return _flash(q, k, v, key_mask, start, window, float(scale), bq, bk)[:, :t]


def _key_blocks(i, start, window, bq, bk, nk):
    """The key blocks [lo, hi) that query block i can see at all."""
    first = start + i * bq
    hi = jnp.minimum(nk, (first + bq - 1) // bk + 1)
    lo = jnp.where(window > 0, jnp.maximum(0, (first - window + 1) // bk), 0)
    return lo, hi


def _scores(qi, kj, mask_j, q_first, k_first, window, scale):
    """One block's masked float32 scores [B, Hkv, G, bq, bk] and its mask."""
    ok = allowed(q_first + jnp.arange(qi.shape[1]), k_first + jnp.arange(kj.shape[1]), window, mask_j)
    sc = jnp.einsum("btkgd,bskd->bkgts", qi, kj, preferred_element_type=jnp.float32) * scale
    return jnp.where(ok[:, None, None], sc, MASKED), ok[:, None, None]


def _forward(q, k, v, key_mask, start, window, scale, bq, bk):
    nq, nk = q.shape[1] // bq, k.shape[1] // bk

    def q_block(i):
        qi = jax.lax.dynamic_slice_in_dim(q, i * bq, bq, axis=1)

        def step(j, carry):
            m, l, acc = carry
            kj, vj, mj = (jax.lax.dynamic_slice_in_dim(x, j * bk, bk, axis=1) for x in (k, v, key_mask))
            sc, _ = _scores(qi, kj, mj, start + i * bq, j * bk, window, scale)
            m_new = jnp.maximum(m, sc.max(-1))
            p = jnp.exp(sc - m_new[..., None])
            fade = jnp.exp(m - m_new)
            pv = jnp.einsum("bkgts,bskd->bkgtd", p.astype(v.dtype), vj, preferred_element_type=jnp.float32)
            return m_new, l * fade + p.sum(-1), acc * fade[..., None] + pv

        rows = qi.shape[:1] + qi.shape[2:4] + (bq,)  # [B, Hkv, G, bq]
        init = (jnp.full(rows, MASKED), jnp.zeros(rows), jnp.zeros(rows + (q.shape[-1],)))
        m, l, acc = jax.lax.fori_loop(*_key_blocks(i, start, window, bq, bk, nk), step, init)
        return (acc / l[..., None]).astype(v.dtype), m, l

    out, m, l = jax.lax.map(q_block, jnp.arange(nq))  # out [nq, B, Hkv, G, bq, D]
    return out.transpose(1, 0, 4, 2, 3, 5).reshape(q.shape), m, l


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _flash(q, k, v, key_mask, start, window, scale, bq, bk):
    return _forward(q, k, v, key_mask, start, window, scale, bq, bk)[0]


def _flash_fwd(q, k, v, key_mask, start, window, scale, bq, bk):
    out, m, l = _forward(q, k, v, key_mask, start, window, scale, bq, bk)
    # Max and sum, not their logsumexp: in a row that sees no key m is float32's lowest value and
    # m + log(l) rounds back to m, which would lose the 1 / l of that row's uniform weights.
    return out, (q, k, v, key_mask, start, window, out, m, l)


def _flash_bwd(scale, bq, bk, res, dout):
    q, k, v, key_mask, start, window, out, m, l = res
    nq, nk = q.shape[1] // bq, k.shape[1] // bk
    # Row sums of dP * P, the softmax's correction term, for all rows at once: [B, Hkv, G, T].
    delta = jnp.einsum("btkgd,btkgd->bkgt", dout.astype(jnp.float32), out.astype(jnp.float32))

    def q_block(carry, xs):
        (dk, dv), (i, mi, li) = carry, xs
        qi, doi = (jax.lax.dynamic_slice_in_dim(x, i * bq, bq, axis=1) for x in (q, dout))
        mi, li = mi[..., None], li[..., None]
        di = jax.lax.dynamic_slice_in_dim(delta, i * bq, bq, axis=3)[..., None]

        def step(j, carry):
            dq, dk, dv = carry
            kj, vj, mj = (jax.lax.dynamic_slice_in_dim(x, j * bk, bk, axis=1) for x in (k, v, key_mask))
            sc, ok = _scores(qi, kj, mj, start + i * bq, j * bk, window, scale)
            p = jnp.exp(sc - mi) / li
            dp = jnp.einsum("btkgd,bskd->bkgts", doi, vj, preferred_element_type=jnp.float32)
            ds = (jnp.where(ok, p * (dp - di), 0.0) * scale).astype(q.dtype)
            dq = dq + jnp.einsum("bkgts,bskd->btkgd", ds, kj, preferred_element_type=jnp.float32)
            dk_j = jnp.einsum("bkgts,btkgd->bskd", ds, qi, preferred_element_type=jnp.float32)
            dv_j = jnp.einsum("bkgts,btkgd->bskd", p.astype(dout.dtype), doi,
                              preferred_element_type=jnp.float32)
            add = lambda acc, x: jax.lax.dynamic_update_slice_in_dim(  # noqa: E731
                acc, jax.lax.dynamic_slice_in_dim(acc, j * bk, bk, axis=1) + x, j * bk, axis=1)
            return dq, add(dk, dk_j), add(dv, dv_j)

        dq = jnp.zeros(qi.shape, jnp.float32)
        dq, dk, dv = jax.lax.fori_loop(*_key_blocks(i, start, window, bq, bk, nk), step, (dq, dk, dv))
        return (dk, dv), dq.astype(q.dtype)

    zeros = jnp.zeros(k.shape, jnp.float32)
    (dk, dv), dq = jax.lax.scan(q_block, (zeros, zeros), (jnp.arange(nq), m, l))
    dq = jnp.moveaxis(dq, 0, 1).reshape(q.shape)
    return dq, dk.astype(k.dtype), dv.astype(v.dtype), None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def use_cudnn(q, t, s, start, window) -> bool:
    """cuDNN's fused kernel fits: a GPU, half-precision inputs, no cache (slots 0..T-1 both ways),
    a static window, a head size it supports."""
    return (jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
            and isinstance(start, int) and start == 0 and t == s and isinstance(window, int)
            and q.shape[-1] % 8 == 0 and q.shape[-1] <= 128)


def _cudnn(q, k, v, key_mask, window, scale, portable):
    t = q.shape[1]
    lengths = jnp.sum(key_mask.astype(jnp.int32), axis=1)
    prefix = jnp.all(key_mask.astype(bool) == (jnp.arange(t)[None] < lengths[:, None]))
    # A row of padding only (length 0) attends its first slot: finite, and it carries no loss.
    seq = jnp.maximum(lengths, 1)

    def fused():
        return jax.nn.dot_product_attention(
            q, k.astype(q.dtype), v.astype(q.dtype), scale=scale, is_causal=True, query_seq_lengths=seq,
            key_value_seq_lengths=seq, local_window_size=(window - 1, 0) if window else None,
            implementation="cudnn").astype(v.dtype)

    return jax.lax.cond(prefix, fused, portable)
