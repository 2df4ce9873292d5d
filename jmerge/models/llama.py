"""The Llama family (Llama 2/3.x, SmolLM2, Mistral, Qwen2, Qwen3) as one Flax NNX model.

Tree mode: the module's `nnx.State` is exactly the jmerge params pytree — HF module paths as
nested dict keys, HF tensor layouts ([out, in] linear weights, rotate-half RoPE), decoder layers
stacked on a leading axis and run with `lax.scan` so compile time stays flat in depth.
Variants are config flags (qkv/o/mlp bias, q/k norm, per-layer sliding window), not subclasses.

Attention works on cache *slots*: keys live in slots [0, S), the queries of a call occupy slots
[start, start + T). Causality and sliding windows are on slot indices (as transformers does with
`cache_position`), padding on a per-slot key mask. Without a cache the slots are simply 0..T-1.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jmerge.config import ModelConfig
from jmerge.models.attention import attention

Params = dict[str, Any]


def _init(rngs: nnx.Rngs, shape: tuple[int, ...], dtype, std: float = 0.02):
    return nnx.Param(std * jax.random.normal(rngs.params(), shape, dtype))


class Linear(nnx.Module):
    """HF-layout linear: weight [out, in], y = x @ W.T (+ b)."""

    def __init__(self, d_in, d_out, bias, *, stack=(), dtype=jnp.float32, rngs):
        self.weight = _init(rngs, stack + (d_out, d_in), dtype)
        if bias:
            self.bias = nnx.Param(jnp.zeros(stack + (d_out,), dtype))

    def __call__(self, x):
        y = jnp.einsum("...i,oi->...o", x, self.weight[...])
        return y + self.bias[...] if hasattr(self, "bias") else y


class RMSNorm(nnx.Module):
    def __init__(self, dim, eps, *, stack=(), dtype=jnp.float32):
        self.weight = nnx.Param(jnp.ones(stack + (dim,), dtype))
        self.eps = eps

    def __call__(self, x):
        # Normalise in float32 then cast back, as transformers does, before scaling.
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * xf.astype(x.dtype)


def rope(x, positions, inv_freq):
    """Rotate-half RoPE. x: [B, T, H, D], positions: [B, T]."""
    freqs = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, D/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x.astype(jnp.float32) * cos + rotated * sin).astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, stack=(), dtype=jnp.float32, rngs):
        d, h, kv, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = Linear(d, h * hd, cfg.qkv_bias, stack=stack, dtype=dtype, rngs=rngs)
        self.k_proj = Linear(d, kv * hd, cfg.qkv_bias, stack=stack, dtype=dtype, rngs=rngs)
        self.v_proj = Linear(d, kv * hd, cfg.qkv_bias, stack=stack, dtype=dtype, rngs=rngs)
        self.o_proj = Linear(h * hd, d, cfg.o_bias, stack=stack, dtype=dtype, rngs=rngs)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps, stack=stack, dtype=dtype)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps, stack=stack, dtype=dtype)
        self.cfg = cfg

    def __call__(self, x, positions, inv_freq, window, kv_cache, key_mask, start):
        cfg = self.cfg
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, cfg.num_heads, cfg.head_dim)
        k = self.k_proj(x).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        v = self.v_proj(x).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rope(q, positions, inv_freq), rope(k, positions, inv_freq)
        if kv_cache is not None:  # (stacked k cache, stacked v cache, this layer's index)
            ck, cv, li = kv_cache
            z = jnp.zeros((), jnp.int32)
            ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype)[None], (li, z, start, z, z))
            cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype)[None], (li, z, start, z, z))
            k = jax.lax.dynamic_index_in_dim(ck, li, 0, keepdims=False)
            v = jax.lax.dynamic_index_in_dim(cv, li, 0, keepdims=False)
            kv_cache = (ck, cv, li)
        if len(set(cfg.layer_windows)) <= 1:  # one window for all layers: static, as fused kernels need
            window = cfg.layer_windows[0] if cfg.layer_windows else 0
        out = attention(q, k, v, start=start, window=window, key_mask=key_mask, scale=cfg.head_dim ** -0.5)
        return self.o_proj(out.reshape(b, t, cfg.num_heads * cfg.head_dim).astype(x.dtype)), kv_cache


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, stack=(), dtype=jnp.float32, rngs):
        d, i = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Linear(d, i, cfg.mlp_bias, stack=stack, dtype=dtype, rngs=rngs)
        self.up_proj = Linear(d, i, cfg.mlp_bias, stack=stack, dtype=dtype, rngs=rngs)
        self.down_proj = Linear(i, d, cfg.mlp_bias, stack=stack, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    """One decoder layer; built with `stack=(L,)` it holds all L layers' weights stacked."""

    def __init__(self, cfg: ModelConfig, *, stack=(), dtype=jnp.float32, rngs):
        self.self_attn = Attention(cfg, stack=stack, dtype=dtype, rngs=rngs)
        self.mlp = MLP(cfg, stack=stack, dtype=dtype, rngs=rngs)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, stack=stack, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, stack=stack, dtype=dtype)

    def __call__(self, x, positions, inv_freq, window, kv_cache, key_mask, start):
        h, kv_cache = self.self_attn(self.input_layernorm(x), positions, inv_freq, window, kv_cache, key_mask, start)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), kv_cache


class Embedding(nnx.Module):
    def __init__(self, vocab, dim, *, dtype=jnp.float32, rngs):
        self.weight = _init(rngs, (vocab, dim), dtype)

    def __call__(self, ids):
        return jnp.take(self.weight[...], ids, axis=0)


class Backbone(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, rngs):
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype, rngs=rngs)
        self.layers = DecoderLayer(cfg, stack=(cfg.num_layers,), dtype=dtype, rngs=rngs)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)


class LlamaForCausalLM(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.model = Backbone(cfg, dtype=dtype, rngs=rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, False, dtype=dtype, rngs=rngs)
        self.cfg = cfg

    def __call__(self, input_ids, attention_mask=None, positions=None, cache=None, *,
                 last_only=False, return_hidden=False, remat=False, layer_xs=None, layer_fn=None):
        """Logits [B, T, V] (float32), and the updated cache when one is given.

        input_ids: [B, T]. attention_mask: [B, T], 1 for real tokens (left padding expected).
        positions: [B, T]; default: count of real tokens before each one (padding-aware).
        cache: dict(k, v: [L, B, S, Hkv, D], mask: [B, S], index: int32 scalar) from `init_cache`.
        last_only: logits of the last slot only ([B, V]) — what a prefill needs.
        layer_xs / layer_fn: scanned per-layer inputs and a function mapping one layer's slice of
        them to that layer's params (pure dict); lets a search merge weights layer by layer inside
        the scan. Default: this model's own stacked layer weights.
        """
        cfg = self.cfg
        b, t = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), jnp.int32)
        attention_mask = attention_mask.astype(jnp.int32)
        if cache is None:
            start, key_mask, prior = 0, attention_mask, jnp.zeros((b,), jnp.int32)
        else:
            start = cache["index"]
            key_mask = jax.lax.dynamic_update_slice_in_dim(cache["mask"], attention_mask, start, axis=1)
            prior = jnp.sum(cache["mask"], axis=1)
        if positions is None:
            positions = prior[:, None] + jnp.cumsum(attention_mask, axis=1) - 1
            positions = jnp.maximum(positions, 0)

        x = self.model.embed_tokens(input_ids)
        inv_freq = jnp.asarray(cfg.inv_freq(), jnp.float32)
        windows = jnp.asarray(cfg.layer_windows or (0,) * cfg.num_layers, jnp.int32)
        layer_def, layer_state = nnx.split(self.model.layers)
        if layer_fn is None:
            layer_xs, layer_fn = nnx.to_pure_dict(layer_state), lambda p: p
        # The whole stacked cache rides in the scan carry and each layer updates its slice in
        # place; scanning per-layer slices in and out would copy the cache on every step.
        kv = (cache["k"], cache["v"]) if cache is not None else None

        def body(carry, xs):
            h, kv = carry
            lx, window, li = xs
            layer = nnx.merge(layer_def, layer_fn(lx))
            kv_l = None if kv is None else (kv[0], kv[1], li)
            h, kv_l = layer(h, positions, inv_freq, window, kv_l, key_mask, start)
            return (h, None if kv is None else kv_l[:2]), None

        if remat:
            body = jax.checkpoint(body)
        (x, kv), _ = jax.lax.scan(body, (x, kv), (layer_xs, windows, jnp.arange(cfg.num_layers)))
        if last_only:
            x = x[:, -1]
        x = self.model.norm(x)
        if return_hidden:
            out = x
        else:
            head = self.model.embed_tokens.weight[...] if cfg.tie_word_embeddings else self.lm_head.weight[...]
            out = jnp.einsum("...d,vd->...v", x, head, preferred_element_type=jnp.float32)
        if cache is None:
            return out
        return out, dict(k=kv[0], v=kv[1], mask=key_mask, index=start + t)


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> dict:
    shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    return dict(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                mask=jnp.zeros((batch, max_len), jnp.int32), index=jnp.zeros((), jnp.int32))


@functools.lru_cache(maxsize=32)
def graphdef(cfg: ModelConfig) -> nnx.GraphDef:
    """The module structure for a config (shapes are not part of it, so it is cheap to cache)."""
    abstract = nnx.eval_shape(lambda: LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)))
    return nnx.split(abstract)[0]


def bind(cfg: ModelConfig, params: Params) -> LlamaForCausalLM:
    """The model module over a params pytree (no copy; params may be tracers)."""
    return nnx.merge(graphdef(cfg), params)


def forward(params: Params, cfg: ModelConfig, input_ids, attention_mask=None, **kw):
    """Functional forward: params are a plain pytree, so jit/grad see only arrays."""
    return bind(cfg, params)(input_ids, attention_mask, **kw)


def init_params(cfg: ModelConfig, seed: int = 0, dtype=jnp.float32) -> Params:
    """Random params (normal 0.02, norms 1) — for unit tests and benchmarks, never for claims."""
    model = LlamaForCausalLM(cfg, dtype=dtype, rngs=nnx.Rngs(seed))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))
