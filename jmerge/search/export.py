"""Merged models made a group of layers at a time, from models that may be parked in host memory.

After its searches a run no longer steps through the base and the experts; it only makes merges
of them (searched, baselines, sweep points) and evaluates one model at a time. So the models are
`park`ed in the host memory of the devices that hold them (each process keeps its own shards),
and `export` makes a merge with two kinds of program:

    export:layers  one group of `group` decoder layers, a layer at a time: each model's layer
                   comes to the device, is merged (`param.layer`, float32 inside), and the
                   group is written in place into the merged model's stacked buffers (donated,
                   so never copied)
    export:rest    the non-layer tensors (embedding, norm, head)

The device then holds the merged model, one layer of each model and the group's merged layers —
never the models beside their merge (at 70B on 8 devices those four copies were 65.7 GiB per device). The
per-layer keys are the slices of the ones `merged.materialise` draws, so both give the same
merge; `export` is the one export of a run (searched merges, baselines, sweep points).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jmerge.objectives import loop_index
from jmerge.search.merged import TaskVectors, deltas, join_layers, layer_keys, split_layers

GROUP = 8  # decoder layers per export:layers call: at 70B, 8 of 80 layers are 1/10 of a model


def host_memory() -> bool:
    """Whether this platform's devices have a host memory space to park arrays in."""
    return any(m.kind == "pinned_host" for m in jax.local_devices()[0].addressable_memories())


def park(tree):
    """The same arrays, sharded alike, in host memory (as they are where there is none). The
    device copies go once the caller drops them."""
    if not host_memory():
        return tree
    return jax.device_put(tree, jax.memory.Space.Host)


def park_abstract(tree):
    """`park` of abstract arrays (ShapeDtypeStructs with shardings), for a dry run."""
    if not host_memory():
        return tree
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding.with_memory_kind(
        "pinned_host")), tree)


def on_device(tree):
    """Arrays in device memory (a no-op for those already there); also inside a jitted program,
    where it is the transfer of a parked argument's slice."""
    return jax.device_put(tree, jax.memory.Space.Device) if host_memory() else tree


def _merge_group(buf, base_layers, expert_layers, theta_layers, key, start, *, param, size):
    """Layers [start, start + size) merged and written into `buf` (the stacked merged layers).
    Each step of the loop brings one layer of each model to the device (`loop_index`: a slice
    taken inside the loop, which XLA cannot hoist as a whole-group float32 cast)."""
    keys = layer_keys(key, jax.tree.leaves(base_layers)[0].shape[0])[0]

    def one(i):
        b, es, th = loop_index((base_layers, expert_layers, theta_layers), i)
        b, es = on_device((b, es))
        return param.layer(b, deltas(b, es), th, None if keys is None else keys[i])
    merged = jax.lax.map(one, start + jnp.arange(size))
    return jax.tree.map(lambda o, m: jax.lax.dynamic_update_slice_in_dim(o, m.astype(o.dtype), start, 0), buf, merged)


def _merge_rest(base_rest, expert_rests, theta_rest, key, *, param):
    b, es = on_device((base_rest, expert_rests))
    return param.rest(b, deltas(b, es), theta_rest, layer_keys(key, 1)[1])


merge_group = jax.jit(_merge_group, static_argnames=("param", "size"), donate_argnums=0)
merge_rest = jax.jit(_merge_rest, static_argnames=("param",))


def _buffers(base_layers, expert_layers, theta_layers, key, param):
    """The merged stacked layers' shapes and dtypes (those `param.layer` gives), on the base's
    shardings in device memory."""
    def one(x):
        return jax.ShapeDtypeStruct(x.shape[1:], x.dtype)
    first = (jax.tree.map(one, base_layers), [jax.tree.map(one, e) for e in expert_layers],
             jax.tree.map(one, theta_layers), None if key is None else key)
    layer = jax.eval_shape(lambda b, es, th, k: param.layer(b, deltas(b, es), th, k), *first)
    n = jax.tree.leaves(base_layers)[0].shape[0]
    kind = "device" if host_memory() else None
    return jax.tree.map(lambda m, b: jax.ShapeDtypeStruct((n,) + m.shape, m.dtype, sharding=(
        b.sharding.with_memory_kind(kind) if kind and b.sharding is not None else b.sharding)), layer, base_layers)


def _parts(base, tvs: TaskVectors, theta, key):
    base_layers, base_rest = split_layers(base)
    layers, rests = zip(*(split_layers(e) for e in tvs.experts))
    n = jax.tree.leaves(base_layers)[0].shape[0]
    return (base_layers, list(layers), theta["layers"], key), (base_rest, list(rests), theta["rest"], key), n


def _starts(n: int, group: int) -> list[int]:
    """Group starts covering n layers with one group size: the last group ends at n (it may redo
    layers of the one before, which writes the same values again)."""
    size = min(group, n)
    return sorted({min(i, n - size) for i in range(0, n, size)})


def export(base, tvs: TaskVectors, theta, param, key=None, group: int = GROUP):
    """The merged params pytree `merged.materialise` gives, made `group` layers at a time (see
    the module's docstring); `base` and `tvs` may be parked or on the device."""
    layers, rest, n = _parts(base, tvs, theta, key)
    size = min(group, n)
    shapes = _buffers(*layers, param)
    buf = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype, device=s.sharding), shapes)
    for start in _starts(n, group):
        buf = merge_group(buf, *layers, start, param=param, size=size)
    return join_layers(buf, merge_rest(*rest, param=param))


def export_programs(base, tvs: TaskVectors, theta, param, key=None, group: int = GROUP) -> dict:
    """The two programs `export` runs, lowered from abstract inputs (ShapeDtypeStructs laid out
    as the run lays them out: parked models in host memory) for a dry run."""
    layers, rest, n = _parts(base, tvs, theta, key)
    return {"export:layers": merge_group.lower(_buffers(*layers, param), *layers, 0, param=param, size=min(group, n)),
            "export:rest": merge_rest.lower(*rest, param=param)}
