"""Merging inside the graph: a merged model's forward pass built layer by layer.

The base and the experts stay separate; each decoder layer's task vectors τ_k = θ_k − θ_base and
merged weights are made in float32 inside the layer scan (rematerialised in the backward pass),
so memory holds the models themselves and one merged layer — never a copy of the task vectors or
of the merged model. What a search learns (coefficients, mask logits, ...) is a pytree `theta`
passed as a jit argument: a new candidate never recompiles.

A parametrisation is a pair of functions over one layer / over the non-layer tensors:
    layer(base_l, tvs_l, theta_l, key_l) -> merged layer params
    rest(base_r, tvs_r, theta_r, key) -> merged non-layer params
where `*_l` are slices of stacked leaves (one layer), `tvs_*` a list of K float32 task-vector
pytrees and the keys (None for deterministic parametrisations) drive stochastic ones such as
relaxed masks.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from jmerge import sharding as shd
from jmerge.errors import JmergeError
from jmerge.models import llama
from jmerge.objectives import Hidden, head_weight, loop_index, token_logprobs


def split_layers(params):
    """(stacked decoder-layer params, everything else)."""
    rest = {k: v for k, v in params.items() if k != "model"}
    rest["model"] = {k: v for k, v in params["model"].items() if k != "layers"}
    return params["model"]["layers"], rest


def join_layers(layers, rest):
    out = dict(rest)
    out["model"] = dict(rest["model"], layers=layers)
    return out


class TaskVectors(NamedTuple):
    """τ_k = experts[k] − the merge's base, kept as the models themselves: each part's τ is taken
    in float32 where the merge needs it (`deltas`), one layer at a time inside the scan. (The
    base is not held again here: a compiled program would count it twice.)"""
    experts: list


def task_vectors(base, experts) -> TaskVectors:
    """The task vectors of `experts` over `base` (which every merge of them is then given)."""
    for e in experts:
        if jax.tree.structure(e) != jax.tree.structure(base) or any(
                x.shape != y.shape for x, y in zip(jax.tree.leaves(e), jax.tree.leaves(base))):
            raise JmergeError("task vectors need experts with the base's tensors and shapes")
    return TaskVectors(list(experts))


def deltas(base, experts) -> list:
    """τ_k of one part of the params (a layer, or the non-layer tensors), in float32."""
    return [jax.tree.map(lambda e, b: e.astype(jnp.float32) - b.astype(jnp.float32), ex, base) for ex in experts]


def layer_keys(key, num_layers):
    """(one key per decoder layer, the non-layer tensors' key); (None, None) without a key."""
    if key is None:
        return None, None
    return jax.random.split(jax.random.fold_in(key, 0), num_layers), jax.random.fold_in(key, 1)


def _split(base, tvs: TaskVectors, theta, param, key, num_layers, mesh=None):
    """(merged non-layer params, the per-layer scan inputs, layer_fn: one layer's inputs -> its
    merged params). The stacked models are sliced inside the loop (`loop_index`); with a `mesh`
    the merged layers and embedding are laid out for batch-parallel layers (`_gathered`,
    `_embedding_by_rows`)."""
    base_layers, base_rest = split_layers(base)
    layers, rests = zip(*(split_layers(e) for e in tvs.experts))
    keys, rest_key = layer_keys(key, num_layers)
    # Rematerialised: the backward pass takes the non-layer τ again from the models rather than
    # keeping K float32 copies of the embedding and the head.
    rest = jax.checkpoint(lambda b, e, th: param.rest(b, deltas(b, e), th, rest_key))(base_rest, rests, theta["rest"])
    stacked = (base_layers, list(layers))

    def layer_fn(x):
        i, th, k = x
        b, experts = loop_index(stacked, i)
        return _gathered(param.layer(b, deltas(b, experts), th, k), mesh)
    return _embedding_by_rows(rest, mesh), (jnp.arange(num_layers), theta["layers"], keys), layer_fn


def _gathered(layer, mesh):
    """One merged layer's weights whole over fsdp (still split over tensor), as FSDP runs a
    layer: each device computes its own rows of the batch. Left to itself XLA may follow the
    weights' fsdp split into the activations (the hidden axis split, every row on every device)."""
    if mesh is None:
        return layer

    def one(path, x):
        spec = shd.spec_for("model/layers/" + shd.path_str(path), (1,) + x.shape, mesh)
        whole = [None if axis == "fsdp" else axis for axis in tuple(spec)[1:]]
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(*whole)))
    return jax.tree_util.tree_map_with_path(one, layer)


def _embedding_by_rows(rest, mesh):
    """The merged embedding split by vocabulary rows over every weight axis (tensor x fsdp),
    none of its width: a lookup then gives each device its own rows of the batch, whole, which
    the gathered layers (`_gathered`) take as they are. Split by width (the load layout) the
    lookup leaves the hidden axis split and every row on every device; gathered whole it costs a
    whole table and a whole float32 gradient per device."""
    if mesh is None:
        return rest
    emb = rest["model"]["embed_tokens"]["weight"]
    rows = shd.spec_for("", emb.shape, mesh, rules=[("", P(("tensor", "fsdp"), None))])
    out = dict(rest)
    out["model"] = dict(rest["model"], embed_tokens={"weight": jax.lax.with_sharding_constraint(emb, NamedSharding(mesh, rows))})
    return out


def _merged(base, tvs, theta, cfg, batch, param, key, mesh=None, **fwd):
    """(the model's output, the params it ran with: merged non-layer tensors, the base's layers,
    which the scan does not read)."""
    rest, xs, layer_fn = _split(base, tvs, theta, param, key, cfg.num_layers, mesh)
    shell = join_layers(split_layers(base)[0], rest)
    out = llama.forward(shell, cfg, batch["input_ids"], batch["attention_mask"], layer_xs=xs,
                        layer_fn=layer_fn, remat=True, **fwd)
    return out, shell


def merged_forward(base, tvs, theta, cfg, batch, param, key=None, **fwd):
    """Logits of the model merged by `param` from (base, task vectors, theta), layer by layer."""
    return _merged(base, tvs, theta, cfg, batch, param, key, **fwd)[0]


def merged_hidden(base, tvs, theta, cfg, batch, param, key=None, mesh=None) -> Hidden:
    """What the objectives take from the merged model: its final hidden states and head weight
    (the logits are never formed whole). `mesh`: the one the models and the batch are on."""
    states, shell = _merged(base, tvs, theta, cfg, batch, param, key, mesh, return_hidden=True)
    return Hidden(states, head_weight(shell, cfg))


def materialise(base, tvs, theta, param, key=None):
    """The merged params pytree in one program (the reference `export.export` is tested
    against; a run exports by layer groups)."""
    num_layers = jax.tree.leaves(split_layers(base)[0])[0].shape[0]
    rest, xs, layer_fn = _split(base, tvs, theta, param, key, num_layers)
    return join_layers(jax.lax.map(layer_fn, xs), rest)


def weighted_ce(out, batch):
    """−Σ weight · log p(token): `weight` [B, T] already holds w_type / n_tokens_of_type. `out`:
    logits or `Hidden`."""
    return weighted_nll(token_logprobs(out, batch["input_ids"]), batch)


def weighted_nll(lp, batch):
    """The same from the token log-probabilities [B, T]."""
    return -jnp.sum(lp * batch["weight"])
