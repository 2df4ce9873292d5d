"""The in-memory merge: every input model loaded onto the mesh, merged there.

One jitted program merges the non-layer tensors, and the stacked layer leaves of elementwise
methods (vmapped over the layers). A method that reduces over each tensor (TIES, DARE, SLERP,
...) is called once per layer instead, on that layer's buffers: vmap would let XLA order the
reductions over a batched tensor differently (1-ulp differences in DARE's L1 rescale), and
streaming must match bit for bit; a lax.map over the layers is ~4x slower on XLA:CPU. The layer
axis is the only axis the merge is split on (shard_map), so no reduction inside a tensor
depends on the mesh shape.
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
from jmerge.config import ModelConfig
from jmerge.engine.finite import flag_rows, refuse_nonfinite_inputs, refuse_nonfinite_output
from jmerge.engine.groups import Group, build_groups, group_params, in_one_program
from jmerge.engine.options import MergeOptions
from jmerge.engine.prepare import Prepared, job_inputs
from jmerge.engine.programs import per_tensor
from jmerge.io import hf


def layer_split(mesh: Mesh, n: int) -> tuple[P, int]:
    """How n layers spread over the mesh, and into how many blocks: split over every axis of
    size > 1 when they divide n (each device merges its own block), else P() (every device
    merges all of them)."""
    axes = tuple(a for a in mesh.axis_names if mesh.shape[a] > 1)
    size = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    return (P(axes), size) if axes and n % size == 0 else (P(), 1)


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


def _group_arrays(inputs, g: Group, n: int | None = None) -> list:
    """The arrays of `g.inputs`: stacked layer leaves (cut to its slice when n is given), or named
    tensors."""
    if g.layered:
        xs = [_get(inputs[ref]["layers"], g.path[2:]) for ref in g.inputs]
        if n is not None:
            xs = [x[a:a + n] for x, a in zip(xs, g.starts)]
        return xs
    return [inputs[ref]["named"][g.names[0]] for ref in g.inputs]


def memory_fn(p: Prepared, groups: list[Group], mesh: Mesh):
    """The single jitted program's function for the groups `in_one_program`:
    (inputs {model: {"layers": stacked layer leaves, "named": {HF name: array}}}, per-group
    params, per-group keys) -> ([output array per group], [finiteness flags per group])."""
    from jmerge.merge import get
    method = get(p.checked.plan.method.name)

    def fn(inputs, gparams, gkeys):
        ys, finite = [], []
        for g, prm, key in zip(groups, gparams, gkeys):
            call = functools.partial(per_tensor, method, g.static, p.out_dtype)
            n = len(g.names) if g.layered else None
            base, models = g.split(_group_arrays(inputs, g, n))
            if g.layered:
                spec, _ = layer_split(mesh, n)
                y, fin = on_devices(jax.vmap(lambda a: call(*a)), mesh, (spec,), spec)((base, models, key, prm))
            else:
                y, fin = on_devices(lambda a: call(*a), mesh, (P(),), P())((base, models, key, prm))
            ys.append(y)
            finite.append(fin)
        return ys, finite

    return fn


@functools.lru_cache(maxsize=None)
def _layer_step(method_name: str, static: tuple, out_dtype: np.dtype, has_base: bool, mesh: Mesh, spec: P):
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

    def local(xs, i, offsets, prm, keys):
        sl = lax.optimization_barrier([lax.dynamic_index_in_dim(x, i + o, 0, keepdims=False)
                                       for x, o in zip(xs, offsets)])
        base, models = (sl[0], sl[1:]) if has_base else (None, sl)
        prm_i = jax.tree.map(lambda v: lax.dynamic_index_in_dim(v, i, 0, keepdims=False), prm)
        key = None if keys is None else lax.dynamic_index_in_dim(keys, i, 0, keepdims=False)
        y, fin = per_tensor(method, static, out_dtype, base, models, key, prm_i)
        return y[None], fin[None]

    return jax.jit(on_devices(local, mesh, (spec, P(), P(), spec, spec), (spec, spec)))


def concat_bits(xs) -> jax.Array:
    """jnp.concatenate along axis 0, done on the raw bits: XLA:CPU concatenates bfloat16 arrays
    4x slower than the same bytes as uint16 (measured: 30 x 1.7 MB, 140 ms against 33 ms)."""
    dtype = xs[0].dtype
    if dtype == jnp.bool_ or jnp.dtype(dtype).itemsize not in (1, 2, 4, 8):
        return jnp.concatenate(xs, axis=0)
    raw = jnp.dtype(f"uint{8 * jnp.dtype(dtype).itemsize}")
    return lax.bitcast_convert_type(jnp.concatenate([lax.bitcast_convert_type(x, raw) for x in xs], axis=0), dtype)


@functools.lru_cache(maxsize=None)
def _stack_blocks(mesh: Mesh, spec: P):
    """[a list of n_calls arrays of one layer per device] -> the stacked leaf in layer order (device d
    holds layers d * n_calls ...), assembled on each device from its own blocks."""
    return jax.jit(on_devices(concat_bits, mesh, (spec,), spec))


def merge_layers(p: Prepared, g: Group, mesh: Mesh, inputs, prm, keys):
    """A layered group of a method that reduces over each tensor: one call per layer (per local
    layer when the mesh splits the layers), then the layers stacked."""
    n = len(g.names)
    spec, blocks = layer_split(mesh, n)
    xs = _group_arrays(inputs, g)
    offsets = np.asarray(g.starts, np.int32)
    if mesh.size > 1:
        # Each device gets its block of this slice's layers (P(): all of them) before the step,
        # never resharded inside it: an all-gather there hands the method a buffer in another
        # layout, and its reductions over the tensor then add in another order (1 ulp off
        # streaming).
        xs = [jax.device_put(x[a:a + n], NamedSharding(mesh, spec)) for x, a in zip(xs, g.starts)]
        offsets = np.zeros_like(offsets)
    calls = n // blocks
    step = _layer_step(p.checked.plan.method.name, g.static, p.out_dtype, g.base is not None, mesh, spec)
    outs = [step(xs, np.int32(i), offsets, prm, keys) for i in range(calls)]
    stack = _stack_blocks(mesh, spec)
    return stack([y for y, _ in outs]), stack([f for _, f in outs])


@functools.lru_cache(maxsize=None)
def _assemble_fn(out_cfg: ModelConfig, paths: tuple, mesh: Mesh):
    out_sh = shd.param_shardings(_abstract(out_cfg), mesh)

    def assemble(ys):
        pieces: dict[tuple, list] = {}
        for path, y in zip(paths, ys):
            pieces.setdefault(path, []).append(y)
        out: dict = {}
        for path, parts in pieces.items():
            leaf = parts[0] if len(parts) == 1 else concat_bits(parts)
            leaf = jax.lax.with_sharding_constraint(leaf, _get(out_sh, path))
            node = out
            for k in path[:-1]:
                node = node.setdefault(k, {})
            node[path[-1]] = leaf
        return out

    return jax.jit(assemble)


def merge_arrays(p: Prepared, groups: list[Group], inputs, gparams, gkeys, mesh: Mesh, progress: bool = False):
    """(merged params pytree, [finiteness flags per group]) from inputs already on the mesh."""
    from jmerge.merge import get
    method = get(p.checked.plan.method.name)
    one = [i for i, g in enumerate(groups) if in_one_program(method, g)]
    ys, finite = [None] * len(groups), [None] * len(groups)
    if one:
        if mesh not in p.compiled:
            p.compiled[mesh] = jax.jit(memory_fn(p, [groups[i] for i in one], mesh))
        y1, f1 = p.compiled[mesh](inputs, [gparams[i] for i in one], [gkeys[i] for i in one])
        for i, y, f in zip(one, y1, f1):
            ys[i], finite[i] = y, f
    rest = [i for i, g in enumerate(groups) if not in_one_program(method, g)]
    from tqdm.auto import tqdm
    for i in tqdm(rest, desc="merge", unit="leaf", disable=not progress or not rest):
        ys[i], finite[i] = merge_layers(p, groups[i], mesh, inputs, gparams[i], gkeys[i])
    merged = _assemble_fn(p.out_cfg, tuple(g.path for g in groups), mesh)(ys)
    return merged, finite


def _abstract(cfg: ModelConfig):
    from jmerge.models.layout import abstract_params
    return abstract_params(cfg)


def load_inputs(p: Prepared, groups: list[Group], mesh: Mesh, progress: bool = False) -> dict:
    """Every input on the mesh: stacked layer leaves straight from the files; embeddings, final
    norm and lm_head by HF name (vocabulary-aligned exactly as streaming aligns them)."""
    c = p.checked
    inputs = {}
    for ref, m in c.models.items():
        params = hf.load_params(m.source, m.cfg, mesh, p.compute_dtype, allow_nonfinite=True,
                                where=m.ref, progress=progress)
        inputs[ref] = {"layers": params["model"]["layers"], "named": {}}
        del params
    for g in groups:
        if g.layered:
            continue
        job = p.jobs[g.names[0]]
        for ref, x in zip(job.inputs, job_inputs(p, job)):
            # not device_put: across processes it compares the copies, and NaN != NaN
            inputs[ref]["named"][g.names[0]] = jax.make_array_from_callback(
                x.shape, NamedSharding(mesh, P()), lambda index, x=x: x[index])
    return inputs


def memory_params(p: Prepared, mesh: Mesh, *, seed: int, progress: bool = False):
    """The merged params pytree on the mesh (raises on non-finite inputs)."""
    groups = build_groups(p)
    inputs = load_inputs(p, groups, mesh, progress)
    gp = [group_params(p, g, seed) for g in groups]
    merged, finite = merge_arrays(p, groups, inputs, [x[0] for x in gp], [x[1] for x in gp], mesh, progress)
    bad, bad_out = [], {}
    # few bytes, but split over the layers like the group (across processes: gathered)
    for g, fin in zip(groups, map(shd.host_value, finite)):
        fin = np.asarray(fin).reshape(len(g.names), -1)
        for row, name in zip(fin, g.names):
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
