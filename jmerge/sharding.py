"""Device mesh and parameter sharding rules.

Mesh axes are ("data", "fsdp", "tensor"). Params are sharded by regex rules matched on the
"/"-joined pytree path; a dimension that a mesh axis does not divide is left unsharded on that
axis (tiny test models, odd vocab sizes) rather than failing.
"""

from __future__ import annotations

import math
import re
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jmerge.errors import JmergeError, first_line

AXES = ("data", "fsdp", "tensor")

# Stacked layer tensors carry the layer axis first (never sharded: scan walks it).
LLAMA_RULES: list[tuple[str, P]] = [
    (r"embed_tokens/weight$", P("tensor", "fsdp")),
    (r"lm_head/weight$", P("tensor", "fsdp")),
    (r"layers/.*(q_proj|k_proj|v_proj|gate_proj|up_proj)/weight$", P(None, "tensor", "fsdp")),
    (r"layers/.*(o_proj|down_proj)/weight$", P(None, "fsdp", "tensor")),
    (r"layers/.*(q_proj|k_proj|v_proj|gate_proj|up_proj)/bias$", P(None, "tensor")),
    (r"layers/.*(o_proj|down_proj)/bias$", P(None, "fsdp")),
    (r".*", P()),  # norms and anything else: replicated
]


def parse_mesh_spec(spec: str | None, n: int | None = None) -> dict[str, int]:
    """'fsdp=4,tensor=2' -> sizes per axis for n devices (default: all); one axis may be -1 (=
    the remaining devices)."""
    n = jax.device_count() if n is None else n
    if not spec:
        return {"data": 1, "fsdp": n, "tensor": 1}
    sizes = {a: 1 for a in AXES}
    for part in spec.split(","):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in AXES:
            raise JmergeError(f"--mesh: unknown axis {name!r}; axes are {', '.join(AXES)}")
        try:
            sizes[name] = int(value)
        except ValueError:
            raise JmergeError(f"--mesh: {part!r} is not axis=size") from None
    free = [a for a, s in sizes.items() if s == -1]
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if len(free) > 1 or any(s == 0 or s < -1 for s in sizes.values()):
        raise JmergeError(f"--mesh {spec!r}: sizes must be positive (one axis may be -1)")
    if free:
        sizes[free[0]] = n // fixed
    if math.prod(sizes.values()) != n:
        raise JmergeError(f"--mesh {spec!r} needs {math.prod(sizes.values())} devices; {n} are present")
    return sizes


def make_mesh(spec: str | dict | None = None, devices=None) -> Mesh:
    """The mesh of a spec (a string sized to `devices`, or axis sizes) over `devices` (default:
    every device; a dict of sizes needing fewer takes the first ones, a sub-mesh). Within a
    slice the device order follows the interconnect (`jax.make_mesh`); across the slices of a
    multi-slice TPU pod `data` is the outer axis, so only data-parallel traffic crosses the slow
    network. No spec: fsdp over all devices, or over each slice with data over the slices."""
    devs = list(devices) if devices is not None else jax.devices()
    sizes = mesh_sizes(spec, devs)
    shape = tuple(sizes[a] for a in AXES)
    if math.prod(shape) > len(devs):
        raise JmergeError(f"a mesh of {math.prod(shape)} devices needs more than the {len(devs)} given")
    devs = devs[: math.prod(shape)]
    # Auto axes: XLA propagates shardings through the model; no per-op annotations needed.
    types = (AxisType.Auto,) * len(AXES)
    try:
        if _slices(devs) == 1:
            return jax.make_mesh(shape, AXES, axis_types=types, devices=devs)
        return Mesh(slice_grid(shape, devs), AXES, axis_types=types)
    except ValueError as e:  # the interconnect cannot be cut into this shape (TPU topologies)
        raise JmergeError(f"mesh {dict(zip(AXES, shape))}: {first_line(e)}") from None


def mesh_sizes(spec: str | dict | None, devices) -> dict[str, int]:
    """Axis sizes of a spec over `devices` (see make_mesh)."""
    if isinstance(spec, dict):
        return spec
    slices = _slices(devices)
    if not spec and slices > 1:
        return {"data": slices, "fsdp": len(devices) // slices, "tensor": 1}
    return parse_mesh_spec(spec, len(devices))


def _slices(devices) -> int:
    """TPU slices (joined by the slow data-centre network). GPU hosts, which jax also gives slice
    indices, count as one: fsdp across GPU nodes is the usual layout and stays allowed."""
    return len({getattr(d, "slice_index", 0) for d in devices if getattr(d, "platform", "") == "tpu"}) or 1


def split_over_slices(shape: tuple[int, ...], slices: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(within a slice, across slices) for a mesh over `slices` equal slices: the data axis (the
    first) is split, the others stay inside every slice."""
    if shape[0] % slices:
        raise JmergeError(f"the devices span {slices} slices: the mesh's data axis ({shape[0]}) must be "
                          f"a multiple of {slices} (e.g. --mesh data={slices},fsdp=-1)")
    return (shape[0] // slices, *shape[1:]), (slices, *(1 for _ in shape[1:]))


def slice_grid(shape: tuple[int, ...], devices) -> np.ndarray:
    """Devices of several slices as an array of `shape`, the data axis outermost over slices."""
    from jax.experimental import mesh_utils
    per = {}
    for d in devices:
        per.setdefault(d.slice_index, []).append(d)
    if len({len(v) for v in per.values()}) > 1:
        counts = ", ".join(f"slice {k}: {len(v)}" for k, v in sorted(per.items()))
        raise JmergeError(f"the mesh's devices are spread unevenly over slices ({counts}); use whole slices")
    inner, outer = split_over_slices(shape, len(per))
    return mesh_utils.create_hybrid_device_mesh(inner, outer, devices)


def _fit(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
    dims = list(spec) + [None] * (len(shape) - len(spec))
    out = []
    for size, axis in zip(shape, dims[: len(shape)]):
        names = (axis,) if isinstance(axis, str) else tuple(axis or ())
        n = math.prod(mesh.shape[a] for a in names)
        out.append(axis if names and size % n == 0 else None)
    return P(*out)


def path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def spec_for(path: str, shape: tuple[int, ...], mesh: Mesh, rules=LLAMA_RULES) -> P:
    for pattern, spec in rules:
        if re.search(pattern, path):
            return _fit(spec, shape, mesh)
    return P()


def param_shardings(abstract: Any, mesh: Mesh, rules=LLAMA_RULES) -> Any:
    """A NamedSharding for every leaf of a (possibly abstract) params pytree."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: NamedSharding(mesh, spec_for(path_str(p), tuple(x.shape), mesh, rules)), abstract)


def batch_sharding(mesh: Mesh, ndim: int = 2, batch_axis: int = 0, heads_axis: int | None = None,
                   heads: int = 0) -> NamedSharding:
    """Inputs: the batch axis over data×fsdp, the rest replicated; a heads axis (a KV cache's)
    over tensor when tensor divides the head count."""
    spec = [None] * ndim
    spec[batch_axis] = ("data", "fsdp")
    if heads_axis is not None and heads % mesh.shape["tensor"] == 0:
        spec[heads_axis] = "tensor"
    return NamedSharding(mesh, P(*spec))


def device_bytes(x) -> int:
    """Bytes of one device's shard of an array, abstract (`jax.ShapeDtypeStruct`) or real; the
    whole array when it has no sharding."""
    sharding = getattr(x, "sharding", None)
    shape = sharding.shard_shape(tuple(x.shape)) if sharding is not None else tuple(x.shape)
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def host_value(x) -> np.ndarray:
    """One array's whole value on every process: small results (generated tokens, a batch's
    scores, λ), or one tensor at a time of an export, never a model. An array sharded across
    processes cannot be read directly; every process must make this call."""
    if getattr(x, "is_fully_addressable", True) or x.is_fully_replicated:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
