"""What a search learns, as merge parametrisations (see `merged.py`).

- `Coefficients`: AdaMerging-style θ = θ_0 + Σ_k λ_{k,ℓ[,m]} τ_k, λ per task vector × layer
  (optionally × module type), plus one λ_k for the non-layer tensors.
- `Masks`: SOMF: per-element (or per-row) relaxed-Bernoulli masks on the task vectors,
  θ = θ_safe + Σ_k λ_k (τ_k ⊙ m)/mean(m) per tensor.
- `MethodSettings`: per-layer parameters of a registered merge method (weight, density, t, ...),
  searched by CMA-ES (EvoMM).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from jmerge import sharding as shd
from jmerge.errors import JmergeError

TRANSFORMS = ("identity", "clamp", "softmax")
MASK_MODES = ("relaxed", "soft", "threshold", "sample", "ones")


def _paths(tree) -> list[tuple[str, ...]]:
    return [tuple(k.key for k in p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _map_with_path(fn, *trees):
    return jax.tree_util.tree_map_with_path(lambda p, *xs: fn(tuple(k.key for k in p), *xs), *trees)


def _combine(base, deltas, lam):
    """base + Σ_k lam_k · delta_k in float32, cast back to the base's dtype."""
    acc = base.astype(jnp.float32)
    for k, d in enumerate(deltas):
        acc = acc + lam[k] * d
    return acc.astype(base.dtype)


@dataclasses.dataclass(frozen=True)
class Coefficients:
    k: int
    modules: tuple[str, ...] = ()  # module names for per-module λ; () = one λ per layer
    transform: str = "identity"
    init: float = 0.5
    clamp: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self):
        if self.transform not in TRANSFORMS:
            raise JmergeError(f"unknown coefficient transform {self.transform!r}; known: {', '.join(TRANSFORMS)}")

    def theta0(self, num_layers: int) -> dict:
        m = max(len(self.modules), 1)
        raw = self.init if self.transform != "softmax" else 0.0  # softmax of zeros = 1/K each
        return {"layers": jnp.full((num_layers, self.k, m), raw, jnp.float32),
                "rest": jnp.full((self.k,), raw, jnp.float32)}

    def lam(self, raw):
        """Coefficients from raw parameters; the task-vector axis is the second-to-last or last."""
        if self.transform == "softmax":
            axis = -2 if raw.ndim >= 2 else -1
            return jax.nn.softmax(raw, axis=axis)
        return raw

    def project(self, theta):
        if self.transform == "clamp":
            return jax.tree.map(lambda t: jnp.clip(t, *self.clamp), theta)
        return theta

    def layer(self, base_l, tvs_l, theta_l, aux=None):
        lam = self.lam(theta_l)  # [K, M]
        index = {name: i for i, name in enumerate(self.modules)}

        def leaf(path, b, *tv):
            col = index.get(path[-2], 0) if self.modules else 0
            return _combine(b, tv, lam[:, col])
        return _map_with_path(leaf, base_l, *tvs_l)

    def rest(self, base_r, tvs_r, theta_r, key=None):
        lam = self.lam(theta_r)
        return jax.tree.map(lambda b, *tv: _combine(b, tv, lam), base_r, *tvs_r)

    def report(self, theta) -> dict:
        """λ as nested lists, for the JSON output: layers [L][K][M] and rest [K]."""
        return {"layers": shd.host_value(self.lam(theta["layers"])).tolist(),
                "rest": shd.host_value(self.lam(theta["rest"])).tolist(), "modules": list(self.modules)}


@dataclasses.dataclass(frozen=True)
class Masks:
    k: int
    lam: tuple[float, ...]  # per task-vector coefficient of the fusion
    shared: bool = True  # one mask for all task vectors (SOMF)
    granularity: str = "element"  # or "row": one logit per output row
    temperature: float = 0.5
    init: float = 0.0  # logits; 0 -> p = 0.5
    mode: str = "relaxed"  # training: relaxed; export: soft | threshold | sample; "ones": no mask

    def __post_init__(self):
        if self.granularity not in ("element", "row"):
            raise JmergeError(f"mask granularity must be element or row, not {self.granularity!r}")
        if self.mode not in MASK_MODES:
            raise JmergeError(f"unknown mask mode {self.mode!r}; known: {', '.join(MASK_MODES)}")

    def _logit_shape(self, shape, stacked: bool):
        if self.granularity == "row" and len(shape) - stacked >= 2:
            return shape[:-1] + (1,)
        return shape

    def theta0(self, base) -> dict:
        """Logits laid out like the params they mask (see `layout`)."""
        return jax.tree.map(lambda x: jnp.full(x.shape, self.init, x.dtype, device=x.sharding), self.layout(base))

    def layout(self, base) -> dict:
        """The logits' shapes (float32), sharded like the params when those are on a mesh (a row
        mask's size-1 axis is not split); `base` may be abstract."""
        from jmerge.search.merged import split_layers
        layers, rest = split_layers(base)
        n = 1 if self.shared else self.k

        def leaf(x, stacked):
            shape = self._logit_shape(tuple(x.shape), stacked)
            where = getattr(x, "sharding", None)
            if not isinstance(where, NamedSharding):
                return jax.ShapeDtypeStruct(shape, jnp.float32)
            spec = (tuple(where.spec) + (None,) * len(shape))[:len(shape)]
            spec = spec if shape == tuple(x.shape) else spec[:-1] + (None,)
            return jax.ShapeDtypeStruct(shape, jnp.float32, sharding=NamedSharding(where.mesh, P(*spec)))

        def logits(tree, stacked):
            return [jax.tree.map(lambda x: leaf(x, stacked), tree) for _ in range(n)]
        return {"layers": logits(layers, True), "rest": logits(rest, False)}

    def sample(self, logit, key):
        if self.mode == "ones":
            return jnp.ones_like(logit)
        if self.mode == "soft":
            return jax.nn.sigmoid(logit)
        if self.mode == "threshold":
            return (logit > 0).astype(jnp.float32)
        if self.mode == "sample":
            return jax.random.bernoulli(key, jax.nn.sigmoid(logit)).astype(jnp.float32)
        # Relaxed Bernoulli (binary Concrete): reparameterised, gradients reach the logits.
        u = jax.random.uniform(key, logit.shape, minval=1e-6, maxval=1 - 1e-6)
        return jax.nn.sigmoid((logit + jnp.log(u) - jnp.log1p(-u)) / self.temperature)

    def _fuse(self, base, tvs, logits, key):
        paths = _paths(base)
        ids = {p: i for i, p in enumerate(paths)}

        def leaf(path, b, *rest):
            tv, lg = rest[:self.k], rest[self.k:]
            lkey = jax.random.fold_in(key, ids[path]) if key is not None else None
            masked = []
            for j, t in enumerate(tv):
                logit = lg[0 if self.shared else j]
                m = jnp.broadcast_to(self.sample(logit, jax.random.fold_in(lkey, j) if lkey is not None else None), t.shape)
                masked.append(t * m / jnp.maximum(jnp.mean(m), 1e-6))  # per-tensor mean keeps the scale
            return _combine(b, masked, self.lam)
        return _map_with_path(leaf, base, *tvs, *logits)

    def layer(self, base_l, tvs_l, theta_l, key=None):
        return self._fuse(base_l, tvs_l, theta_l, key)

    def rest(self, base_r, tvs_r, theta_r, key=None):
        return self._fuse(base_r, tvs_r, theta_r, key)

    def probabilities(self, theta):
        return jax.tree.map(jax.nn.sigmoid, theta)


@dataclasses.dataclass(frozen=True)
class MethodSettings:
    """Per-layer parameters of a registered merge method (EvoMM's genome): each decoder layer
    gets its own per-model values (e.g. weight, density) and global values (e.g. slerp's t); the
    non-layer tensors get one set. The method runs on every HF tensor inside the graph; random
    methods draw from a key folded from (seed, layer, tensor)."""

    method: str
    k: int
    names: tuple[str, ...] = ()  # per-model parameters searched, e.g. ("weight", "density")
    global_names: tuple[str, ...] = ()  # global parameters searched, e.g. ("t",)
    fixed: tuple[tuple[str, float], ...] = ()  # global parameters held fixed

    def theta0(self, num_layers: int, init: dict[str, float]) -> dict:
        one = {"model": jnp.asarray([[init[n]] * self.k for n in self.names], jnp.float32).reshape(len(self.names), self.k),
               "global": jnp.asarray([init[n] for n in self.global_names], jnp.float32)}
        return {"layers": jax.tree.map(lambda v: jnp.broadcast_to(v, (num_layers,) + v.shape), one), "rest": one}

    def _apply(self, base, tvs, theta, key):
        from jmerge.merge import registry
        m = registry.get(self.method)
        ids = {p: i for i, p in enumerate(_paths(base))}
        kw = {n: [theta["model"][i, j] for j in range(self.k)] for i, n in enumerate(self.names)}
        kw.update({n: theta["global"][i] for i, n in enumerate(self.global_names)})
        kw.update(dict(self.fixed))

        def leaf(path, b, *tv):
            models = [(b.astype(jnp.float32) + t).astype(b.dtype) for t in tv]
            lkey = jax.random.fold_in(key, ids[path]) if (m.stochastic and key is not None) else None
            return m.fn(b, models, key=lkey, **kw).astype(b.dtype)
        return _map_with_path(leaf, base, *tvs)

    def layer(self, base_l, tvs_l, theta_l, key=None):
        return self._apply(base_l, tvs_l, theta_l, key)

    def rest(self, base_r, tvs_r, theta_r, key=None):
        return self._apply(base_r, tvs_r, theta_r, key)
