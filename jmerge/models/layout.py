"""The params pytree's shapes and dtypes for a config, written out without building the flax
module: merging, checking and file I/O need only the layout, and importing flax would cost a
merge ~0.3 s of its few seconds. `tests/test_layout.py` holds it equal to the module's own
`nnx.eval_shape` for every config variant the family has."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jmerge.config import ModelConfig


def _linear(d_in, d_out, bias, stack, dtype):
    out = {"weight": jax.ShapeDtypeStruct(stack + (d_out, d_in), dtype)}
    if bias:
        out["bias"] = jax.ShapeDtypeStruct(stack + (d_out,), dtype)
    return out


def _norm(dim, stack, dtype):
    return {"weight": jax.ShapeDtypeStruct(stack + (dim,), dtype)}


@functools.lru_cache(maxsize=64)
def _shapes(cfg: ModelConfig, dtype) -> dict:
    d, i, hd, stack = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim, (cfg.num_layers,)
    attn = {"q_proj": _linear(d, cfg.num_heads * hd, cfg.qkv_bias, stack, dtype),
            "k_proj": _linear(d, cfg.num_kv_heads * hd, cfg.qkv_bias, stack, dtype),
            "v_proj": _linear(d, cfg.num_kv_heads * hd, cfg.qkv_bias, stack, dtype),
            "o_proj": _linear(cfg.num_heads * hd, d, cfg.o_bias, stack, dtype)}
    if cfg.qk_norm:
        attn.update(q_norm=_norm(hd, stack, dtype), k_norm=_norm(hd, stack, dtype))
    layers = {"self_attn": attn,
              "mlp": {"gate_proj": _linear(d, i, cfg.mlp_bias, stack, dtype),
                      "up_proj": _linear(d, i, cfg.mlp_bias, stack, dtype),
                      "down_proj": _linear(i, d, cfg.mlp_bias, stack, dtype)},
              "input_layernorm": _norm(d, stack, dtype),
              "post_attention_layernorm": _norm(d, stack, dtype)}
    tree = {"model": {"embed_tokens": {"weight": jax.ShapeDtypeStruct((cfg.vocab_size, d), dtype)},
                      "layers": layers, "norm": _norm(d, (), dtype)}}
    if not cfg.tie_word_embeddings:
        tree["lm_head"] = _linear(d, cfg.vocab_size, False, (), dtype)
    return tree


def abstract_params(cfg: ModelConfig, dtype=jnp.float32) -> dict:
    """Shapes and dtypes of the params pytree, nothing allocated (a fresh pytree per call)."""
    return jax.tree.map(lambda v: v, _shapes(cfg, jnp.dtype(dtype)))
