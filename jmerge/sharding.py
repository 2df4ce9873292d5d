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

from jmerge.errors import JmergeError

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


def parse_mesh_spec(spec: str | None) -> dict[str, int]:
    """'fsdp=4,tensor=2' -> sizes per axis; one axis may be -1 (= the remaining devices)."""
    n = jax.device_count()
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
    sizes = spec if isinstance(spec, dict) else parse_mesh_spec(spec)
    n = math.prod(sizes[a] for a in AXES)
    devs = np.asarray(devices if devices is not None else jax.devices()[:n])
    # Auto axes: XLA propagates shardings through the model; no per-op annotations needed.
    return Mesh(devs.reshape(tuple(sizes[a] for a in AXES)), AXES,
                axis_types=(AxisType.Auto,) * len(AXES))


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


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Inputs: batch over data×fsdp when it divides, the rest replicated."""
    return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
