"""The programs a merge runs, lowered from abstract inputs (shapes, dtypes, shardings; no array):
the in-memory merge's stages in the order it runs them, each with what else is alive on a device
beside it, and streaming's per-tensor programs. A dry run compiles these, not copies of them."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from jmerge import sharding as shd
from jmerge.engine import memory
from jmerge.engine.groups import Group, build_groups, group_params
from jmerge.engine.keys import tensor_key
from jmerge.engine.prepare import Prepared, embed_name, job_params, realigned
from jmerge.engine.programs import input_specs, jitted_tensor_fn, signature
from jmerge.engine.split import Layout, input_specs as group_input_specs
from jmerge.io import hf


@dataclasses.dataclass(frozen=True)
class Stage:
    """One program call of the in-memory merge."""
    name: str
    lowered: jax.stages.Lowered
    live: int  # bytes per device alive beside the call's own arguments and outputs
    key: tuple  # the same key: the same program and arguments


def _key(fn, args) -> tuple:
    leaves, tree = jax.tree.flatten(args)
    return (id(fn), tree, tuple((tuple(np.shape(x)), str(x.dtype), str(getattr(x, "sharding", None)))
                                for x in leaves))


def _group_out(p: Prepared, g: Group, lay: Layout, mesh: Mesh) -> jax.ShapeDtypeStruct:
    shape = hf.hf_layout(p.out_cfg)[g.names[0]]
    shape = (lay.padded,) + (shape if g.layered else shape[1:])
    return jax.ShapeDtypeStruct(shape, p.out_dtype, sharding=NamedSharding(mesh, lay.spec))


def _label(g: Group) -> str:
    if not g.layered:
        return g.names[0]
    first, last = (int(n.split(".")[2]) for n in (g.names[0], g.names[-1]))
    return f"model.layers.{first}-{last}." + ".".join(g.path[2:])


def memory_stages(p: Prepared, mesh: Mesh, seed: int = 0) -> list[Stage]:
    """Every program call of `memory.merge_arrays` on `mesh`, in order (a layer step and its
    move once per group: the repeats differ only in the layer index)."""
    method = p.checked.plan.method
    out_sh = shd.param_shardings(memory._abstract(p.out_cfg), mesh)
    groups = build_groups(p)
    stages: list[Stage] = []
    resident = 0  # placed output leaves
    pending: list[tuple] = []  # this leaf's merged groups (abstract output, real length), not yet placed

    def add(name, fn, args, live):
        stages.append(Stage(name, fn.lower(*args), live, _key(fn, args)))

    for gi, g in enumerate(groups):
        lay = memory.layout(p, g, mesh)
        leaf_sh = memory._get(out_sh, g.path)
        prm, keys = memory.padded_params(g, lay, *group_params(p, g, seed))
        xs = group_input_specs(p, g, lay, mesh)
        out = _group_out(p, g, lay, mesh)
        live = resident + sum(shd.device_bytes(y) for y, _ in pending)
        label = _label(g)
        if lay.kind == "steps":
            step = memory.layer_step(method.name, g.static, p.out_dtype, g.base is not None, mesh, lay.spec)
            one = jax.ShapeDtypeStruct((lay.blocks,) + out.shape[1:], out.dtype, sharding=out.sharding)
            moved = jax.ShapeDtypeStruct(one.shape, one.dtype, sharding=leaf_sh) if mesh.size > 1 else one
            done = (lay.per_device - 1) * shd.device_bytes(moved)  # the calls before the last, moved
            add(f"{label}: layer step", step, (xs, np.int32(0), prm, keys), live + done)
            if mesh.size > 1:
                add(f"{label}: move", memory.move_fn(leaf_sh), (one,), live + done + sum(map(shd.device_bytes, xs)))
            pending += [(moved, min(lay.blocks, lay.n - i * lay.blocks)) for i in range(lay.per_device)]
        else:
            fn = memory.merge_fn(method.name, g.static, p.out_dtype, lay.kind, mesh, lay.spec)
            base, models = g.split(xs)
            add(f"{label}: merge ({lay.kind})", fn, (base, models, keys, prm), live)
            pending.append((out, lay.n))
        if gi + 1 == len(groups) or groups[gi + 1].path != g.path:
            if not memory.placed(pending, leaf_sh):
                ys, cuts = zip(*pending)
                add(f"{'.'.join(g.path)}: place", memory.place_fn(leaf_sh, cuts), (list(ys),), resident)
            resident += shd.device_bytes(jax.ShapeDtypeStruct(_leaf_shape(p, g), p.out_dtype, sharding=leaf_sh))
            pending = []
    return stages


def _leaf_shape(p: Prepared, g: Group) -> tuple[int, ...]:
    return tuple(memory._get(memory._abstract(p.out_cfg), g.path).shape)


def stream_programs(p: Prepared, seed: int = 0) -> dict[str, jax.stages.Lowered]:
    """Streaming's per-tensor programs, one per distinct input signature, largest tensor first,
    each named by the first output tensor that runs it (on one device, as streaming runs)."""
    plan = p.checked.plan
    layout = hf.hf_layout(p.out_cfg)
    jobs = sorted(p.jobs.values(), key=lambda j: -int(np.prod(layout[j.out_name], dtype=np.int64)))
    out, seen = {}, set()
    for job in jobs:
        specs = input_specs(p, job) or _declared_specs(p, job, layout)
        dyn, static = job_params(job, plan.static_params, p.masks)
        sig = signature(static, specs, dyn)
        if sig in seen:
            continue
        seen.add(sig)
        fn = jitted_tensor_fn(plan.method.name, static, p.out_dtype)
        key = tensor_key(seed, job.out_name) if plan.method.stochastic else None
        base, models = job.split(specs)
        out[job.out_name] = fn.lower(base, models, key, dyn)
    return out


def _declared_specs(p: Prepared, job, layout) -> list[jax.ShapeDtypeStruct]:
    """The job's inputs as their sources declare them, where `input_specs` will not predict what
    a read returns (realigned embeddings, GGUF and adapter sources)."""
    out = []
    for ref, name in zip(job.inputs, job.in_names):
        m = p.checked.models[ref]
        if realigned(p, job):
            name, shape = embed_name(m, job.out_name), layout[job.out_name]
        else:
            shape = tuple(m.source.shape(name))
        out.append(jax.ShapeDtypeStruct(shape, p.compute_dtype or np.dtype(m.source.dtype(name))))
    return out


def memory_programs(p: Prepared, mesh: Mesh, seed: int = 0) -> dict[str, jax.stages.Lowered]:
    """The in-memory merge's distinct programs (the first stage running each)."""
    out, seen = {}, set()
    for s in memory_stages(p, mesh, seed):
        if s.key not in seen:
            seen.add(s.key)
            out[s.name] = s.lowered
    return out

