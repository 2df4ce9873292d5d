"""What the in-memory merge merges at once: groups of output tensors (a non-layer tensor, or one
stacked layer leaf over the layers of one output slice), with their stacked parameters and keys."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jmerge.engine.jobs import BaseFirst, TensorJob
from jmerge.engine.keys import tensor_key
from jmerge.engine.prepare import Prepared, job_params
from jmerge.errors import JmergeError
from jmerge.io import hf


@dataclasses.dataclass(frozen=True)
class Group(BaseFirst):
    """Output tensors merged together: a non-layer tensor, or one stacked layer leaf over the
    layers of one output slice."""
    path: tuple[str, ...]  # output leaf
    names: tuple[str, ...]  # output HF names, in layer order
    layered: bool
    base: str | None
    models: tuple[str, ...]
    starts: tuple[int, ...]  # first input layer per input (base first); layered groups only
    static: tuple


def _static_only(j: TensorJob, static_names) -> tuple:
    return tuple(sorted((k, v[0] if isinstance(v, tuple) else v)
                        for k, v in j.params.items() if k in static_names))


def build_groups(p: Prepared) -> list[Group]:
    """The output's groups, in the order of its leaves (and of the slices within a leaf)."""
    groups = []
    static_names = p.checked.plan.static_params
    for path in hf.leaf_paths(p.out_cfg):
        names = hf.leaf_names(path, p.out_cfg)
        layered = path[:2] == ("model", "layers")
        runs = [names[lo:hi] for lo, hi in p.checked.resolved.slice_layers] if layered else [names]
        for run in runs:
            j = p.jobs[run[0]]
            starts = tuple(int(n.split(".")[2]) for n in j.in_names) if layered else ()
            groups.append(Group(path, tuple(run), layered, j.base, j.models, starts,
                                _static_only(j, static_names)))
    return groups


def group_params(p: Prepared, g: Group, seed: int):
    """Traced parameters (per-layer vectors for a layered group) and keys of one group."""
    dyn = [job_params(p.jobs[n], p.checked.plan.static_params, p.masks)[0] for n in g.names]
    if g.layered and len({jax.tree.structure(d) for d in dyn}) > 1:
        # An optional path file (regmean's grams) holds some of the leaf's layers: the stacked
        # call cannot take an array for some layers and None for others.
        raise JmergeError(f"the {', '.join(sorted(p.masks.optional))} files hold some layers of "
                          f"{'.'.join(g.path[2:])} and not others ({g.names[0]} ... {g.names[-1]}): "
                          "give all of them or none, or merge with --stream")
    params = jax.tree.map(lambda *xs: np.stack(xs), *dyn) if g.layered else dyn[0]
    keys = None
    if p.checked.plan.method.stochastic:
        ks = [tensor_key(seed, n) for n in g.names]
        keys = jnp.stack(ks) if g.layered else ks[0]
    return params, keys

