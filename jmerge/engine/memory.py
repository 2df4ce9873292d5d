"""The in-memory merge: the inputs on the mesh, merged there one group at a time.

A group (a non-layer tensor, or a stacked layer leaf over one output slice) is loaded onto the
mesh in the layout `split.group_layout` gives it, merged, and its output placed in the params'
sharding before the next group is read: a device holds its share of the merged model, one
group's inputs and that group's temporaries, never every input at once (TIES of 3 x Llama-3-70B
in bf16 on 8 devices: 29 GiB a device, where loading every input first needed 133 GiB;
`footprint.memory_need`).

Elementwise methods merge a layer leaf in one call, vmapped over each device's layers. A method
that reduces over each tensor (TIES, DARE, SLERP, ...) is called once per layer instead (each
device merging one of its layers per call), on that layer's buffers, each call's output moved
into the leaf's sharding at once: vmap would let XLA order the reductions over a batched tensor differently
(1-ulp differences in DARE's L1 rescale), and streaming must match bit for bit; a lax.map over
the layers is ~4x slower on XLA:CPU. No axis inside a tensor is ever split (shard_map over the
layer or row axis only), so no reduction depends on the mesh shape.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jmerge import sharding as shd
from jmerge.engine.finite import flag_rows, refuse_nonfinite_inputs, refuse_nonfinite_output
from jmerge.engine.groups import Group, build_groups, group_params
from jmerge.engine.options import MergeOptions
from jmerge.engine.prepare import Prepared
from jmerge.engine.programs import per_tensor
from jmerge.engine.split import Layout, group_layout, load_group, pad_rows
from jmerge.io import hf
from jmerge.progress import bar as progress_bar


def on_devices(f, mesh: Mesh, in_specs, out_specs):
    """f run per device on its blocks (P(): every device computes the whole thing), so the
    partitioner never splits the inside of a tensor."""
    if mesh.size == 1:
        return f
    return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def layout(p: Prepared, g: Group, mesh: Mesh) -> Layout:
    return group_layout(p.checked.plan.method, g, hf.hf_layout(p.out_cfg)[g.names[0]], mesh)


@functools.lru_cache(maxsize=None)
def merge_fn(method_name: str, static: tuple, out_dtype: np.dtype, kind: str, mesh: Mesh, spec: P):
    """The one jitted call merging a group of an elementwise layer leaf ("layers": vmapped over
    each device's layers), a non-layer tensor split over rows ("rows") or whole on every device
    ("whole"): (base, models, keys, params) -> (output, finiteness flags)."""
    from jmerge.merge import get
    call = functools.partial(per_tensor, get(method_name), static, out_dtype)
    if kind == "layers":
        return jax.jit(on_devices(jax.vmap(call), mesh, (spec,) * 4, (spec, spec)))
    if kind == "rows":
        def rows(base, models, key, prm):
            y, fin = call(base, models, key, prm)
            return y, fin[None]  # one row of flags per device
        return jax.jit(on_devices(rows, mesh, (spec, spec, P(), P()), (spec, spec)))
    return jax.jit(on_devices(call, mesh, (P(),) * 4, (P(), P())))


@functools.lru_cache(maxsize=None)
def layer_step(method_name: str, static: tuple, out_dtype: np.dtype, has_base: bool, mesh: Mesh, spec: P):
    """One jitted call merging layer i of a group (on each device, its i-th local layer).

    The layer's inputs are cut out behind an optimization barrier, meant to give the method what
    streaming hands it; XLA may still fuse the slices into the method's reductions, so the bits
    are held to streaming's by tests/test_method_contract.py, not by the barrier. Measured on XLA:CPU (SmolLM2's 30 gate_proj layers,
    TIES, same load): ~4x faster called layer by layer than as one lax.map or vmap over the
    stacked leaf (~100 ms against ~400 ms: a loop body that slices its inputs is far slower than
    the same code on whole buffers); writing each layer into a donated stacked output instead of
    stacking at the end cost ~80 ms more.
    """
    from jmerge.merge import get
    method = get(method_name)

    def local(xs, i, prm, keys):
        sl = lax.optimization_barrier([lax.dynamic_index_in_dim(x, i, 0, keepdims=False) for x in xs])
        base, models = (sl[0], sl[1:]) if has_base else (None, sl)
        prm_i = jax.tree.map(lambda v: lax.dynamic_index_in_dim(v, i, 0, keepdims=False), prm)
        key = None if keys is None else lax.dynamic_index_in_dim(keys, i, 0, keepdims=False)
        y, fin = per_tensor(method, static, out_dtype, base, models, key, prm_i)
        return y[None], fin[None]

    return jax.jit(on_devices(local, mesh, (spec, P(), spec, spec), (spec, spec)))


def _on_bits(f, xs) -> jax.Array:
    """f over xs, done on their raw bits: XLA:CPU concatenates bfloat16 arrays 4x slower than the
    same bytes as uint16 (measured: 30 x 1.7 MB, 140 ms against 33 ms)."""
    dtype = xs[0].dtype
    if dtype == jnp.bool_ or jnp.dtype(dtype).itemsize not in (1, 2, 4, 8):
        return f(xs)
    raw = jnp.dtype(f"uint{8 * jnp.dtype(dtype).itemsize}")
    return lax.bitcast_convert_type(f([lax.bitcast_convert_type(x, raw) for x in xs]), dtype)


def concat_bits(xs) -> jax.Array:
    """jnp.concatenate along axis 0, on the raw bits (`_on_bits`)."""
    return _on_bits(lambda v: jnp.concatenate(v, axis=0), xs)


@functools.lru_cache(maxsize=None)
def move_fn(sharding: NamedSharding):
    """A layer step's output (one layer per device) moved into the leaf's sharding as soon as it
    is made: moving the stacked leaf at once took ~4x its size in temporaries (XLA:CPU, 70B
    up_proj on 8 devices: 16 GiB a device), one layer per device takes ~4x that layer."""
    return jax.jit(lambda y: y, out_shardings=sharding)


@functools.lru_cache(maxsize=None)
def place_fn(sharding: NamedSharding, cuts: tuple[int, ...]):
    """A leaf's merged pieces -> the output leaf in the params' sharding: each cut to its real
    length (no padding), joined along axis 0."""
    def place(ys):
        parts = [y[:n] for y, n in zip(ys, cuts)]
        return parts[0] if len(parts) == 1 else concat_bits(parts)
    return jax.jit(place, out_shardings=sharding)


def padded_params(g: Group, lay: Layout, prm, keys):
    """A layer group's per-layer parameters and keys in the order and padding of its layers."""
    if not g.layered:
        return prm, keys
    return jax.tree.map(lambda v: pad_rows(v, lay), prm), pad_rows(keys, lay)


def merge_group(p: Prepared, g: Group, lay: Layout, mesh: Mesh, load, prm, keys, leaf: NamedSharding):
    """(g's output as pieces [(array, real length)], its finiteness flags in layer order).
    "steps": one piece per call, already in `leaf`, the output leaf's sharding; otherwise one
    piece in g's layout. `load()` gives g's inputs, which live only inside this call."""
    method = p.checked.plan.method
    prm, keys = padded_params(g, lay, prm, keys)
    if lay.kind == "steps":
        step = layer_step(method.name, g.static, p.out_dtype, g.base is not None, mesh, lay.spec)
        move = move_fn(leaf) if mesh.size > 1 else (lambda y: y)  # one device: nothing to move
        xs = load()
        pieces, fins = [], []
        for i in range(lay.per_device):
            y, f = step(xs, np.int32(i), prm, keys)
            pieces.append((move(y), min(lay.blocks, lay.n - i * lay.blocks)))
            fins.append(f)
        del xs, y
        fin = _concat(fins)
    else:
        base, models = g.split(load())
        y, fin = merge_fn(method.name, g.static, p.out_dtype, lay.kind, mesh, lay.spec)(base, models, keys, prm)
        del base, models
        pieces = [(y, lay.n)]
    fin.block_until_ready()  # the inputs freed before the next group's are read
    return pieces, fin


@jax.jit
def _concat(xs):
    return jnp.concatenate(xs, axis=0)


def flag_table(fin, lay: Layout) -> np.ndarray:
    """merge_group's flags as one row per output tensor (padding cut, row blocks combined)."""
    fin = np.asarray(shd.host_value(fin))
    if lay.kind in ("layers", "steps"):
        return fin[:lay.n]
    return fin.reshape(-1, fin.shape[-1]).all(axis=0, keepdims=True)


def merge_arrays(p: Prepared, groups: list[Group], inputs, gparams, gkeys, mesh: Mesh, progress: bool = False):
    """(merged params pytree in the params' shardings, [finiteness flags per group]).
    inputs[i]: group i's arrays, as `load_inputs` gives them (memory_params reads each when
    its group merges)."""
    out_sh = shd.param_shardings(_abstract(p.out_cfg), mesh)
    merged: dict = {}
    finite, pieces = [], []
    bar = progress_bar(len(groups), progress, "merge")
    for i, g in enumerate(groups):
        lay = layout(p, g, mesh)
        leaf = _get(out_sh, g.path)
        done, fin = merge_group(p, g, lay, mesh, lambda i=i: inputs[i], gparams[i], gkeys[i], leaf)
        finite.append(fin)
        pieces += done
        del done
        if i + 1 == len(groups) or groups[i + 1].path != g.path:
            node = merged
            for k in g.path[:-1]:
                node = node.setdefault(k, {})
            node[g.path[-1]] = _place(pieces, leaf)
            pieces = []
        bar.update(1)
    bar.close()
    return merged, finite


def placed(pieces, sharding: NamedSharding) -> bool:
    """Whether a leaf's merged pieces ((array or its abstract value, real length), ...) are
    already the output leaf: one piece, unpadded, in the leaf's sharding."""
    if len(pieces) != 1:
        return False
    y, n = pieces[0]
    return y.shape[0] == n and y.sharding == sharding


def _place(pieces, sharding):
    if placed(pieces, sharding):
        return pieces[0][0]
    ys, cuts = zip(*pieces)
    return place_fn(sharding, cuts)(list(ys))


def _abstract(cfg):
    from jmerge.models.layout import abstract_params
    return abstract_params(cfg)


def load_inputs(p: Prepared, groups: list[Group], mesh: Mesh) -> list[list[jax.Array]]:
    """Every group's inputs on the mesh at once (what merge_arrays merges; a benchmark's load)."""
    return [load_group(p, g, layout(p, g, mesh), mesh) for g in groups]


class _OnDemand:
    """Group i's inputs read from the files when merge_arrays asks for them."""

    def __init__(self, p: Prepared, groups: list[Group], mesh: Mesh):
        self.p, self.groups, self.mesh = p, groups, mesh

    def __getitem__(self, i: int) -> list[jax.Array]:
        g = self.groups[i]
        return load_group(self.p, g, layout(self.p, g, self.mesh), self.mesh)


def memory_params(p: Prepared, mesh: Mesh, *, seed: int, progress: bool = False):
    """The merged params pytree on the mesh (raises on non-finite inputs)."""
    groups = build_groups(p)
    gp = [group_params(p, g, seed) for g in groups]
    merged, finite = merge_arrays(p, groups, _OnDemand(p, groups, mesh), [x[0] for x in gp],
                                  [x[1] for x in gp], mesh, progress)
    bad, bad_out = [], {}
    # few bytes, but split over the layers like the group (across processes: gathered)
    for g, fin in zip(groups, finite):
        for row, name in zip(flag_table(fin, layout(p, g, mesh)), g.names):
            ins, out_ok = flag_rows(row)
            bad += [f"{r}: {p.jobs[name].in_names[k]}" for k, (ok, r) in enumerate(zip(ins, g.inputs)) if not ok]
            if not out_ok:
                bad_out[name] = None
    refuse_nonfinite_inputs(p, bad)
    # named as streaming names them: the first in the output files' order
    order = {n: i for i, n in enumerate(hf.hf_layout(p.out_cfg))}
    refuse_nonfinite_output(p, sorted(bad_out, key=order.__getitem__))
    return merged


def memory_merge(p: Prepared, out: Path, mesh: Mesh, options: MergeOptions):
    """Every input loaded onto `mesh`, merged there, written to `out`; returns the merged params."""
    merged = memory_params(p, mesh, seed=options.seed, progress=options.progress)
    hf.save_hf(merged, p.out_cfg, out, max_shard_size=options.max_shard_size, dtype=p.out_dtype,
               force=options.force, progress=options.progress, tokenizer_writer=p.write_extras)
    return merged
