"""export (a merge made by layer groups from parked models) against materialise (one program):
the same bits for every parametrisation, group size, dtype and mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmerge import sharding as shd
from jmerge.config import from_hf_dict
from jmerge.models import llama
from jmerge.search import export as E
from jmerge.search.merged import materialise, task_vectors
from jmerge.search.parametrisations import Coefficients, Masks, MethodSettings
from tests.conftest import TINY

reference = jax.jit(materialise, static_argnames=("param",))


def config():
    # 5 layers: groups of 2 and 3 leave a last group that overlaps the one before
    return from_hf_dict({**TINY, "num_hidden_layers": 5, "model_type": "llama", "hidden_act": "silu",
                         "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False})


def trio(cfg, dtype, mesh=None):
    rng = np.random.default_rng(0)

    def noise(x):
        return jnp.asarray(rng.normal(0, 0.3, x.shape), jnp.float32)
    base = jax.tree.map(noise, llama.init_params(cfg))
    models = [base] + [jax.tree.map(lambda x: x + noise(x), base) for _ in range(2)]
    models = [jax.tree.map(lambda x: x.astype(dtype), m) for m in models]
    if mesh is not None:
        models = [jax.device_put(m, shd.param_shardings(m, mesh)) for m in models]
    return models


def params_and_thetas(cfg, base):
    rng = np.random.default_rng(1)
    coef = Coefficients(k=2)
    th = coef.theta0(cfg.num_layers)
    th = jax.tree.map(lambda t: t + jnp.asarray(rng.normal(0, 0.3, t.shape), t.dtype), th)
    masks = Masks(k=2, lam=(1.0, 0.7), granularity="row", mode="sample")
    mth = jax.tree.map(lambda t: t + jnp.asarray(rng.normal(0, 1.0, t.shape), t.dtype), masks.theta0(base))
    out = [("coefficients", coef, th), ("masks", masks, mth)]
    dare = MethodSettings("dare_ties", 2, ("weight", "density"))  # sums over tensors, drops keyed by layer
    return out + [("dare_ties", dare, dare.theta0(cfg.num_layers, {"weight": 0.8, "density": 0.5}))]


def same_bits(a, b):
    for (p, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape, p
        assert np.array_equal(np.asarray(x.astype(jnp.float32)), np.asarray(y.astype(jnp.float32))), \
            (jax.tree_util.keystr(p), float(jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32)))))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_export_is_materialise_bit_for_bit(dtype):
    cfg = config()
    base, *experts = trio(cfg, dtype)
    tvs = task_vectors(base, experts)
    key = jax.random.PRNGKey(3)
    parked = E.park((base, experts))
    assert E.host_memory() and jax.tree.leaves(parked)[0].sharding.memory_kind == "pinned_host"
    ptvs = task_vectors(parked[0], parked[1])
    for name, param, theta in params_and_thetas(cfg, base):
        want = reference(base, tvs, theta, param=param, key=key)
        for group in ((2, 8) if dtype == jnp.float32 else (3,)):  # 2 and 3 overlap a group
            got = E.export(parked[0], ptvs, theta, param, key, group=group)
            assert jax.tree.leaves(got)[0].sharding.memory_kind == "device"
            same_bits(got, want)
        same_bits(E.export(base, tvs, theta, param, key, group=3), want)  # models on the device


def test_export_on_a_mesh_is_the_single_device_merge():
    cfg = config()
    mesh = shd.make_mesh("fsdp=2,tensor=2", jax.devices()[:4])
    single = trio(cfg, jnp.bfloat16)
    placed = trio(cfg, jnp.bfloat16, mesh)
    key = jax.random.PRNGKey(5)
    for name, param, theta in params_and_thetas(cfg, single[0]):
        want = reference(single[0], task_vectors(single[0], single[1:]), theta, param=param, key=key)
        parked = E.park(placed)
        got = E.export(parked[0], task_vectors(parked[0], parked[1:]), theta, param, key, group=2)
        for x, s in zip(jax.tree.leaves(got), jax.tree.leaves(shd.param_shardings(got, mesh))):
            assert x.sharding.is_equivalent_to(s.with_memory_kind("device"), x.ndim), name
        same_bits(got, want)


def test_group_starts_cover_every_layer_once_per_size():
    for n in range(1, 12):
        for g in range(1, 14):
            starts = E._starts(n, g)
            size = min(g, n)
            covered = sorted({i for s in starts for i in range(s, s + size)})
            assert covered == list(range(n)) and all(s + size <= n for s in starts), (n, g, starts)
            assert len(starts) == -(-n // size)
