"""Merging inside the graph: a merged model's forward pass built layer by layer.

The base and the K task vectors stay separate; each decoder layer's merged weights are made
inside the layer scan (rematerialised in the backward pass), so memory holds the task vectors,
one base and one merged layer — never K + 1 whole models. What a search learns (coefficients,
mask logits, ...) is a pytree `theta` passed as a jit argument: a new candidate never recompiles.

A parametrisation is a pair of functions over one layer / over the non-layer tensors:
    layer(base_l, tvs_l, theta_l, key_l) -> merged layer params
    rest(base_r, tvs_r, theta_r, key) -> merged non-layer params
where `*_l` are slices of stacked leaves (one layer), `tvs_*` a list of K task-vector pytrees and
the keys (None for deterministic parametrisations) drive stochastic ones such as relaxed masks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jmerge.models import llama


def split_layers(params):
    """(stacked decoder-layer params, everything else)."""
    rest = {k: v for k, v in params.items() if k != "model"}
    rest["model"] = {k: v for k, v in params["model"].items() if k != "layers"}
    return params["model"]["layers"], rest


def join_layers(layers, rest):
    out = dict(rest)
    out["model"] = dict(rest["model"], layers=layers)
    return out


def task_vectors(base, experts):
    """τ_k = θ_k − θ_base in float32."""
    return [jax.tree.map(lambda e, b: e.astype(jnp.float32) - b.astype(jnp.float32), ex, base) for ex in experts]


def _keys(key, num_layers):
    if key is None:
        return None, None
    return jax.random.split(jax.random.fold_in(key, 0), num_layers), jax.random.fold_in(key, 1)


def merged_forward(base, tvs, theta, cfg, batch, param, key=None, **fwd):
    """Logits of the model merged by `param` from (base, tvs, theta), layer by layer."""
    base_layers, base_rest = split_layers(base)
    tv_layers, tv_rest = zip(*(split_layers(t) for t in tvs))
    layer_keys, rest_key = _keys(key, cfg.num_layers)
    rest = param.rest(base_rest, list(tv_rest), theta["rest"], rest_key)
    shell = join_layers(base_layers, rest)  # layers here are ignored: layer_xs replaces them
    xs = (base_layers, list(tv_layers), theta["layers"], layer_keys)

    def layer_fn(x):
        b, t, th, a = x
        return param.layer(b, t, th, a)

    return llama.forward(shell, cfg, batch["input_ids"], batch["attention_mask"], layer_xs=xs,
                         layer_fn=layer_fn, remat=True, **fwd)


def materialise(base, tvs, theta, param, key=None):
    """The merged params pytree (for export or evaluation by generation)."""
    base_layers, base_rest = split_layers(base)
    tv_layers, tv_rest = zip(*(split_layers(t) for t in tvs))
    num_layers = jax.tree.leaves(base_layers)[0].shape[0]
    layer_keys, rest_key = _keys(key, num_layers)
    rest = param.rest(base_rest, list(tv_rest), theta["rest"], rest_key)
    layers = jax.lax.map(lambda x: param.layer(*x), (base_layers, list(tv_layers), theta["layers"], layer_keys))
    return join_layers(layers, rest)


def weighted_ce(logits, batch):
    """−Σ weight · log p(token): `weight` [B, T] already holds w_type / n_tokens_of_type."""
    from jmerge.objectives import token_logprobs
    return -jnp.sum(token_logprobs(logits, batch["input_ids"]) * batch["weight"])
