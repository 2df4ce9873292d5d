"""The blocked attention kernel against the dense formula: values, gradients, memory, dispatch."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import padded_batch
from jmerge.io import load_model
from jmerge.models import attention as A
from jmerge.models import llama

# (T, S, H, Hkv, start, window, left padding per row, block): causal, left padding, windows,
# GQA / MQA, a cache offset, decode steps, and sizes that are padded up to whole blocks.
CASES = [
    (10, 10, 4, 2, 0, 0, (0, 3), 4),
    (13, 13, 4, 2, 0, 3, (0, 5), 4),
    (16, 16, 8, 1, 0, 0, (0, 3), 8),
    (3, 17, 4, 2, 5, 0, (0, 7), 4),
    (1, 17, 4, 2, 12, 4, (2, 7), 4),
    (6, 20, 6, 3, 9, 5, (1, 10), 4),
]


def _inputs(t, s, h, kv, pad, dtype, seed=0, d=8):
    r = np.random.RandomState(seed)
    q = jnp.asarray(r.randn(2, t, h, d), dtype)
    k, v = (jnp.asarray(r.randn(2, s, kv, d), dtype) for _ in range(2))
    mask = np.ones((2, s), np.int32)
    for row, n in enumerate(pad):
        mask[row, :n] = 0
    return q, k, v, jnp.asarray(mask), r


def _dense(q, k, v, start, window, mask):
    b, t, h, d = q.shape
    g = q.reshape(b, t, k.shape[2], h // k.shape[2], d)
    return A.dense(g, k.astype(q.dtype), v, start, window, mask, d ** -0.5).reshape(q.shape)


def _blocked(q, k, v, start, window, mask, block):
    return A.attention(q, k, v, start=start, window=window, key_mask=mask, scale=q.shape[-1] ** -0.5, block=block)


def _seen(t, s, start, window, mask):
    """[B, T, 1, 1]: rows that see at least one key (the others only need to stay finite)."""
    return A.allowed(start + jnp.arange(t), jnp.arange(s), window, mask).any(-1)[:, :, None, None]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_blocked_matches_dense_values_and_gradients(dtype):
    for t, s, h, kv, start, window, pad, block in CASES if dtype == jnp.float32 else CASES[::3]:
        q, k, v, mask, r = _inputs(t, s, h, kv, pad, dtype)
        seen = _seen(t, s, start, window, mask)
        weights = jnp.asarray(r.randn(*q.shape), jnp.float32) * seen

        @jax.jit
        def both(q, k, v):
            def value_and_grads(fn):
                loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * weights)  # noqa: E731
                return fn(q, k, v), jax.grad(loss, (0, 1, 2))(q, k, v)
            return (value_and_grads(lambda *x: _blocked(*x, start, window, mask, block)),
                    value_and_grads(lambda *x: _dense(*x, start, window, mask)))

        (got, mine), (want, ref) = both(q, k, v)
        assert got.dtype == v.dtype and bool(jnp.isfinite(got.astype(jnp.float32)).all())
        tol = 1e-6 if dtype == jnp.float32 else 2e-2
        np.testing.assert_allclose(np.asarray((got * seen).astype(jnp.float32)),
                                   np.asarray((want * seen).astype(jnp.float32)), rtol=0, atol=tol)
        for a, b in zip(mine, ref):
            assert a.dtype == b.dtype
            a, b = np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32))
            if dtype == jnp.float32:
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
            else:
                assert np.abs(a - b).max() <= 3e-2 * np.abs(b).max(), (t, s, start, window)


def test_traced_start_window_and_checkpoint():
    """start and window as traced scalars (the layer scan, a cache index), under jax.checkpoint."""
    t, s, h, kv, _, _, pad, block = CASES[3]
    q, k, v, mask, r = _inputs(t, s, h, kv, pad, jnp.float32)

    @jax.jit
    def grads(q, k, v, w, start, window):
        mine = jax.checkpoint(lambda q, k, v: jnp.sum(_blocked(q, k, v, start, window, mask, block) * w))
        ref = lambda q, k, v: jnp.sum(_dense(q, k, v, start, window, mask) * w)  # noqa: E731
        return jax.grad(mine, (0, 1, 2))(q, k, v), jax.grad(ref, (0, 1, 2))(q, k, v)

    for start, window in ((5, 0), (7, 3), (14, 2)):
        w = jnp.asarray(r.randn(*q.shape), jnp.float32) * _seen(t, s, start, window, mask)
        mine, ref = grads(q, k, v, w, jnp.int32(start), jnp.int32(window))
        for a, b in zip(mine, ref):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_model_through_blocks_equals_dense(tiny_model_dir, monkeypatch):
    """The model with 4-slot blocks (mixed per-layer windows, left padding, prefill and cached
    decode) gives the logits of the dense path."""
    m = load_model(tiny_model_dir("mistral"))
    cfg = dataclasses.replace(m.cfg, layer_windows=(4, 0, 3))
    ids, mask, _ = padded_batch(cfg.vocab_size, [11, 6])

    def run():
        full = jax.jit(lambda p: llama.forward(p, cfg, ids, mask))(m.params)
        cache = llama.init_cache(cfg, 2, 14)
        step = jax.jit(lambda p, i, a, c: llama.forward(p, cfg, i, a, cache=c))
        logits, cache = step(m.params, ids[:, :9], mask[:, :9], cache)
        outs = [logits]
        for t in range(9, 11):
            logits, cache = step(m.params, ids[:, t:t + 1], mask[:, t:t + 1], cache)
            outs.append(logits)
        return np.asarray(full), np.concatenate([np.asarray(o) for o in outs], axis=1)

    dense = run()
    monkeypatch.setattr(A, "BLOCK", 4)
    blocked = run()
    real = mask.astype(bool)
    for a, b in zip(blocked, dense):
        np.testing.assert_allclose(a[real], b[real], rtol=0, atol=1e-5)


def test_memory_does_not_grow_with_the_square_of_the_sequence():
    """Compiled fwd+bwd scratch at 8192 tokens: about that at 2048 (the dense formula's grows 16x)
    and far below one [T, S] float32 score matrix (256 MiB)."""
    def temp(t):
        q = jax.ShapeDtypeStruct((1, t, 2, 16), jnp.float32)
        k = jax.ShapeDtypeStruct((1, t, 1, 16), jnp.float32)
        mask = jnp.ones((1, t), jnp.int32)
        loss = lambda q, k, v: _blocked(q, k, v, 0, 0, mask, None).sum()  # noqa: E731
        return jax.jit(jax.grad(loss, (0, 1, 2))).lower(q, k, k).compile().memory_analysis().temp_size_in_bytes

    short, long = temp(2048), temp(8192)
    assert long < 2 * short and long < 8192 * 8192 * 4 / 8, (short, long)


def test_block_sizes():
    assert A.block_size(100, 512) == 100  # a short sequence is one block: the dense path
    assert A.block_size(2048, 512) == 512
    assert A.block_size(2304, 512) == 384  # a divisor, so the cache is not padded per step
    assert A.block_size(1031, 512) == 512  # a prime: padded to 1536


def test_dispatch_uses_jnp_on_cpu_and_cudnn_only_where_it_fits(monkeypatch):
    q = jnp.zeros((1, 8, 4, 64), jnp.bfloat16)
    assert jax.default_backend() == "cpu" and not A.use_cudnn(q, 8, 8, 0, 0)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert A.use_cudnn(q, 8, 8, 0, 0) and A.use_cudnn(q, 8, 8, 0, 4)
    assert not A.use_cudnn(q.astype(jnp.float32), 8, 8, 0, 0)  # float32: the jnp kernel
    assert not A.use_cudnn(q, 1, 8, 7, 0)  # a cache: queries are not slots 0..T-1
    assert not A.use_cudnn(q, 8, 8, jnp.int32(0), 0)  # traced start
    assert not A.use_cudnn(q, 8, 8, 0, jnp.int32(4))  # per-layer (traced) window
    assert not A.use_cudnn(jnp.zeros((1, 8, 4, 12), jnp.bfloat16), 8, 8, 0, 0)  # head size
