"""How the in-memory merge lays one group's arrays over the mesh while it merges it, and the
loading of those arrays straight into that layout.

Only whole tensors ever sit on one device, so no reduction inside a tensor depends on the mesh:
- "steps": a layer leaf of a method that reduces over each tensor, merged one layer per device
  per call: split over its layer axis on every mesh axis, padded with zero layers to a multiple
  of the devices (30 layers on 8 devices: 4 per device, 2 of them padding), strided (device d
  holds layers d, d + devices, ...), so that call i makes layers [i * devices, (i + 1) * devices)
  and the calls' outputs join in order without a transposition;
- "layers": a layer leaf of an elementwise method, split the same way in contiguous blocks
  (merged in one call, vmapped over each device's layers);
- "rows": a non-layer tensor of an elementwise method, split over its rows the same way (each
  output element depends only on the same elements of the inputs);
- "whole": a non-layer tensor of a method that reduces over it (or draws random bits shaped
  like it): every device computes the whole tensor, its inputs alive only while it merges.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jmerge.engine.groups import Group
from jmerge.engine.prepare import Prepared, embed_name, job_inputs, realigned


@dataclasses.dataclass(frozen=True)
class Layout:
    kind: str  # "layers" | "rows" | "whole"
    spec: P  # of axis 0 (P(): not split)
    n: int  # real length of axis 0
    padded: int  # length of axis 0 on the mesh (a multiple of `blocks`)
    blocks: int  # devices axis 0 is split over

    @property
    def per_device(self) -> int:
        return self.padded // self.blocks

    def order(self) -> np.ndarray:
        """The layer (or row) at each position of axis 0 on the mesh; n and beyond: padding."""
        r = np.arange(self.padded)
        return (r % self.per_device) * self.blocks + r // self.per_device if self.kind == "steps" else r


def split_axes(mesh: Mesh) -> tuple[tuple[str, ...], int]:
    """The mesh axes of size > 1 and how many devices they span."""
    axes = tuple(a for a in mesh.axis_names if mesh.shape[a] > 1)
    return axes, int(np.prod([mesh.shape[a] for a in axes])) if axes else 1


def layer_split(mesh: Mesh, n: int) -> Layout:
    """n layers split over every device of the mesh, padded to a multiple of the devices."""
    axes, size = split_axes(mesh)
    return Layout("layers", P(axes) if axes else P(), n, -(-n // size) * size, size)


def group_layout(method, g: Group, shape: tuple[int, ...], mesh: Mesh) -> Layout:
    """How group g (whose output tensors have HF shape `shape`) lies on the mesh."""
    if g.layered:
        return dataclasses.replace(layer_split(mesh, len(g.names)), kind="layers" if method.elementwise else "steps")
    if method.elementwise and not method.stochastic:
        return dataclasses.replace(layer_split(mesh, shape[0]), kind="rows")
    return Layout("whole", P(), shape[0], shape[0], 1)


def pad_rows(x, lay: Layout):
    """x (host values along axis 0: per-layer parameters, keys) in the order of lay, padded by
    repeating its last row: padding layers merge like a real one and are cut off after."""
    if x is None or (lay.padded == lay.n and lay.kind != "steps"):
        return x
    return x[np.minimum(lay.order(), lay.n - 1)]


def _dtype(m, names: list[str], dtype) -> np.dtype:
    """The stacked leaf's dtype as loading a model gives it: the compute dtype, else the files'
    when the layers agree, else float32."""
    if dtype is not None:
        return np.dtype(dtype)
    kinds = {np.dtype(m.source.dtype(n)) for n in names}
    return kinds.pop() if len(kinds) == 1 else np.dtype(np.float32)


def _layer_input(m, names: list[str], dtype: np.dtype, shape: tuple, lay: Layout, sharding: NamedSharding):
    """One input's layers `names` stacked in the order of lay (padding: zeros); each process
    reads only its own devices' layers."""
    src = m.source
    order = lay.order()

    def read(index):
        rows = order[index[0]]
        rest = index[1:]
        part = (len(rows),) + tuple(len(range(*s.indices(n))) for s, n in zip(rest, shape[1:]))
        out = np.zeros(part, dtype)
        for j, layer in enumerate(rows):
            if layer >= len(names):
                continue
            if src.reads_into and np.dtype(src.dtype(names[layer])) == dtype:
                src.read_into(names[layer], rest, out[j])
            else:
                out[j] = np.asarray(src.array(names[layer]))[rest]
        return out

    return jax.make_array_from_callback(shape, sharding, read)


def _host_input(x: np.ndarray, lay: Layout, sharding: NamedSharding):
    """A host tensor on the mesh in its layout (rows past its end: zeros)."""
    shape = (lay.padded,) + x.shape[1:]

    def read(index):
        rows = range(*index[0].indices(shape[0]))
        part = x[rows.start:min(rows.stop, x.shape[0])][(slice(None),) + tuple(index[1:])]
        if part.shape[0] == len(rows):
            return part
        out = np.zeros((len(rows),) + part.shape[1:], x.dtype)
        out[:part.shape[0]] = part
        return out

    # not device_put: across processes it compares the copies, and NaN != NaN
    return jax.make_array_from_callback(shape, sharding, read)


def input_names(p: Prepared, g: Group) -> list[list[str]]:
    """Per input of g (base first), the HF names it reads, in output order."""
    jobs = [p.jobs[n] for n in g.names]
    return [[j.in_names[k] for j in jobs] for k in range(len(g.inputs))]


def input_specs(p: Prepared, g: Group, lay: Layout, mesh: Mesh) -> list[jax.ShapeDtypeStruct]:
    """Shape, dtype and sharding of each array `load_group` returns, from the headers."""
    from jmerge.io import hf
    c = p.checked
    sharding = NamedSharding(mesh, lay.spec)
    out = []
    for ref, names in zip(g.inputs, input_names(p, g)):
        m = c.models[ref]
        src = m.source
        if g.layered:
            dtype = _dtype(m, hf.leaf_names(g.path, m.cfg), p.compute_dtype)
            shape = tuple(src.shape(names[0]))
        elif realigned(p, p.jobs[g.names[0]]):
            dtype = p.compute_dtype or np.dtype(src.dtype(embed_name(m, g.names[0])))
            shape = hf.hf_layout(p.out_cfg)[g.names[0]]
        else:
            dtype = p.compute_dtype or np.dtype(src.dtype(names[0]))
            shape = tuple(src.shape(names[0]))
        shape = (lay.padded,) + (shape if g.layered else shape[1:])
        out.append(jax.ShapeDtypeStruct(shape, dtype, sharding=sharding))
    return out


def load_group(p: Prepared, g: Group, lay: Layout, mesh: Mesh) -> list[jax.Array]:
    """g's input arrays on the mesh in layout `lay`: layers straight from the files, non-layer
    tensors (vocabulary-aligned exactly as streaming aligns them) through the host."""
    from jmerge.io import hf
    sharding = NamedSharding(mesh, lay.spec)
    if not g.layered:
        return [_host_input(x, lay, sharding) for x in job_inputs(p, p.jobs[g.names[0]])]
    out = []
    for ref, names in zip(g.inputs, input_names(p, g)):
        m = p.checked.models[ref]
        dtype = _dtype(m, hf.leaf_names(g.path, m.cfg), p.compute_dtype)
        shape = (lay.padded,) + tuple(m.source.shape(names[0]))
        out.append(_layer_input(m, names, dtype, shape, lay, sharding))
    return out
