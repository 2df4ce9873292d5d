"""One contract over every registered merge method. Inputs and parameters come from the
registry's metadata alone (never from a method's name), so a method registered tomorrow is held to
it without anyone touching this file:

1. a pure function: two calls give the same bits, and numpy inputs are left as they were;
2. the inputs' dtype and shape kept, for float32, bfloat16 and float16 inputs;
3. finite output on finite (random normal) input, 2-D and 1-D tensors;
4. deterministic under a key: stochastic methods follow it, the others ignore it;
5. the engine's stream merge and its in-memory merges on 1 and on 8 devices write the same bytes.

Path parameters hold arrays of the tensor's shape, except where PATH_ARRAYS says what a method
wants (regmean's Gram matrices, [in, in]).

Part 5 runs in one subprocess (this file run as a script, with 8 simulated devices) that merges
with every method in turn; the parametrized tests assert on the JSON it writes. It starts with
the module's first test and runs beside parts 1-4.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import jmerge.merge  # importing the package registers every method
from jmerge.merge import registry

METHODS = sorted(registry.METHODS)
# Every dtype and both ranks an HF tensor has, one compilation each.
COMBOS = (("float32", (16, 8)), ("bfloat16", (12,)), ("float16", (5, 7)))
ENGINE_TEST = "test_stream_and_memory_same_bytes"
# The engine's checkpoints: tensors of three shapes only ([32, 32], [16, 32] and [32]), so that it
# compiles few programs per method; two layers, which 8 devices do not divide. Hidden size 16 hid
# 1-ulp differences in 1-D tensors that 32 shows.
SMALL = dict(vocab_size=32, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)


# ---------------------------------------------------------------------------- from the metadata

def gram(shape, rng) -> np.ndarray | None:
    """A Gram matrix XᵀX of random inputs ([in, in], SPD) for a 2-D weight; none (the file lacks
    the tensor) for any other."""
    if len(shape) != 2:
        return None
    x = rng.standard_normal((2 * shape[1], shape[1]))
    return (x.T @ x).astype(np.float32)


# (method, path parameter) -> (tensor shape, rng) -> its array for that tensor, None for none.
PATH_ARRAYS = {("regmean", "grams"): gram}


def path_array(m: registry.Method, k: str, shape, rng) -> np.ndarray | None:
    make = PATH_ARRAYS.get((m.name, k))
    return make(shape, rng) if make else rng.uniform(size=shape).astype(np.float32)


def model_count(m: registry.Method) -> int:
    """Models besides the base: two where the method allows it (so that something is combined),
    else the count it is bound to."""
    n = max(m.min_models, 2)
    return n if m.max_models is None else min(n, m.max_models)


def base_choices(m: registry.Method) -> tuple[bool, ...]:
    """With a base, without one, or both where the base is optional."""
    return {"required": (True,), "optional": (True, False), "none": (False,)}[m.base]


def point(r: registry.Range | None, f: float) -> float:
    """A number at fraction f in (0, 1) of range r; an unbounded side counts as 1 away."""
    lo, hi = (r.low, r.high) if r is not None else (-math.inf, math.inf)
    if math.isfinite(lo) and math.isfinite(hi):
        v = lo + f * (hi - lo)
    elif math.isfinite(lo):
        v = lo + f
    elif math.isfinite(hi):
        v = hi - f
    else:
        v = f
    assert r is None or v in r, (v, r)
    return v


def settings(m: registry.Method, n: int) -> dict:
    """The parameters a contract merge sets: each required one, and each ranged one (a default at
    the edge of its range, density 1, would hide what the method does), a value inside its range,
    per model a different one. Static parameters keep their defaults; paths are set apart."""
    out = {}
    for k, p in m.params.items():
        if p.static or p.path or (p.default is not None and p.range is None):
            continue
        out[k] = tuple(point(p.range, 0.5 + 0.2 * i) for i in range(n)) if p.per_model else point(p.range, 0.5)
    return out


def planned(m: registry.Method, n: int, paths) -> dict:
    """Every parameter's value as the planner hands it to the engine: defaults filled in,
    per-model values as tuples, `paths(name)` for the n values of a path parameter."""
    chosen = settings(m, n)
    out = {}
    for k, p in m.params.items():
        if p.path:
            out[k] = tuple(paths(k))
        elif k in chosen:
            out[k] = chosen[k]
        else:
            out[k] = (p.default,) * n if p.per_model else p.default
    return out


def call_params(m: registry.Method, plan: dict, size: int, arrays: dict) -> tuple[dict, dict]:
    """The keyword arguments of `m.fn` for one tensor of `size` entries, in the form the registry
    promises, as (traced, static): numbers as float32 scalars, per model in a tuple, the host's
    extra parameters added, path values replaced by `arrays[name]`; static ones as Python values."""
    extra = m.host_params(plan, size) if m.host_params is not None else {}
    dyn, static = {}, {}
    for k, v in {**plan, **extra}.items():
        p = m.params.get(k)
        if p is not None and p.static:
            static[k] = v
        elif p is not None and p.path:
            dyn[k] = arrays[k]
        elif isinstance(v, tuple):
            dyn[k] = tuple(x if isinstance(x, np.integer) else np.float32(x) for x in v)
        else:
            dyn[k] = v if isinstance(v, np.integer) else np.float32(v)
    return dyn, static


# ---------------------------------------------------------------------------- direct calls (1-4)

@dataclasses.dataclass
class Run:
    """One method's calls on one set of inputs: results by label, the inputs before and after."""
    what: str
    dtype: np.dtype
    shape: tuple
    before: list  # copies of every numpy input
    after: list  # the same inputs once every call is done
    out: dict  # label -> result as numpy


def bits(x: np.ndarray) -> tuple:
    return x.dtype.str, x.shape, x.tobytes()


@functools.lru_cache(maxsize=None)
def jitted(name: str, static: tuple):
    """The method jitted as the engine jits it: parameters traced, static ones fixed."""
    import jax
    m = registry.METHODS[name]
    return jax.jit(lambda base, models, key, prm: m.fn(base, list(models), key=key, **prm, **dict(static)))


@functools.lru_cache(maxsize=None)
def runs(name: str) -> list[Run]:
    """The method called eagerly on the first inputs with key(0) twice and (deterministic methods,
    as the engine calls them) with key=None; then jitted, as the engine calls it, on every
    (dtype, shape) x base choice with key(0) and key(1), one compilation each."""
    import jax
    m = registry.METHODS[name]
    n = model_count(m)
    k0, k1 = jax.random.key(0), jax.random.key(1)
    rng = np.random.default_rng(0)
    result = []
    for dtype, shape in COMBOS:
        dtype = np.dtype(dtype)
        for with_base in base_choices(m):
            xs = [rng.standard_normal(shape).astype(dtype) for _ in range(n + with_base)]
            base, models = (xs[0], xs[1:]) if with_base else (None, xs)
            arrays = {k: tuple(path_array(m, k, shape, rng) for _ in range(n))
                      for k, p in m.params.items() if p.path}
            plan = planned(m, n, lambda k: [f"<{k} {i}>" for i in range(n)])
            dyn, static = call_params(m, plan, int(np.prod(shape)), arrays)
            inputs = xs + [a for v in arrays.values() for a in v if a is not None]
            before = [a.copy() for a in inputs]
            what = f"{dtype.name} {shape} {'with' if with_base else 'without'} base"
            if not result:
                keys = {"k0": k0, "k0 again": k0, **({} if m.stochastic else {"none": None})}
                out = {label: np.asarray(m.fn(base, list(models), key=key, **dyn, **static))
                       for label, key in keys.items()}
                result.append(Run(what + ", eager", dtype, shape, before, inputs, out))
            fn = jitted(name, tuple(sorted(static.items())))
            out = {label: np.asarray(fn(base, models, key, dyn)) for label, key in (("k0", k0), ("k1", k1))}
            result.append(Run(what + ", jitted", dtype, shape, before, inputs, out))
    return result


@pytest.mark.parametrize("name", METHODS)
def test_pure_function(name):
    for r in runs(name):
        for a, b in zip(r.before, r.after):
            assert bits(a) == bits(b), f"{name}, {r.what}: an input array was modified"
        if "k0 again" in r.out:
            assert bits(r.out["k0"]) == bits(r.out["k0 again"]), f"{name}, {r.what}: two calls differ"


@pytest.mark.parametrize("name", METHODS)
def test_keeps_dtype_and_shape(name):
    for r in runs(name):
        for label, y in r.out.items():
            assert (y.dtype, y.shape) == (r.dtype, r.shape), f"{name}, {r.what}, key {label}"


@pytest.mark.parametrize("name", METHODS)
def test_finite_on_finite_input(name):
    for r in runs(name):
        for label, y in r.out.items():
            assert np.isfinite(y.astype(np.float32)).all(), f"{name}, {r.what}, key {label}"


@pytest.mark.parametrize("name", METHODS)
def test_deterministic_under_a_key(name):
    stochastic = registry.METHODS[name].stochastic
    for r in runs(name):
        if "k0 again" in r.out:
            assert bits(r.out["k0"]) == bits(r.out["k0 again"]), f"{name}, {r.what}: same key, other bits"
        if not stochastic:
            assert len({bits(y) for y in r.out.values()}) == 1, \
                f"{name}, {r.what}: a deterministic method depends on the key"
        elif "k1" in r.out:
            assert bits(r.out["k0"]) != bits(r.out["k1"]), f"{name}, {r.what}: the key is ignored"


# ---------------------------------------------------------------------------- the engine (5)

def engine_config(m: registry.Method, dirs: list[str], work: Path) -> Path:
    """The mergekit YAML the metadata implies over checkpoints dirs[0] (the base, if the method
    takes one) and the next ones; path parameters get a safetensors file per model, of the base's
    tensor shapes (or PATH_ARRAYS')."""
    import yaml
    from safetensors.numpy import load_file, save_file
    n = model_count(m)
    with_base = m.base != "none"
    others = dirs[1:1 + n]
    shapes = {k: v.shape for k, v in load_file(Path(dirs[0]) / "model.safetensors").items()}
    rng = np.random.default_rng(0)

    def paths(k):
        names = [f"{m.name}-{k}-{i}.safetensors" for i in range(n)]
        for f in names:
            arrays = {t: path_array(m, k, s, rng) for t, s in shapes.items()}
            save_file({t: a for t, a in arrays.items() if a is not None}, work / f)
        return names

    plan = planned(m, n, paths)
    chosen = settings(m, n)
    per_model = {k: plan[k] for k, p in m.params.items() if p.per_model and (k in chosen or p.path)}
    glob = {k: v for k, v in chosen.items() if not m.params[k].per_model}
    cfg = {"models": [{"model": d, **({"parameters": {k: v[i] for k, v in per_model.items()}} if per_model else {})}
                      for i, d in enumerate(others)],
           "merge_method": m.name}
    if with_base:
        cfg["base_model"] = dirs[0]
    if glob:
        cfg["parameters"] = glob
    f = work / f"{m.name}.yml"
    f.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return f


def engine_worker(dirs: list[str], work: Path) -> dict:
    """name -> {mode: {file: sha256}} (or {"error": ...}) for every method: stream, in memory on
    the default 1-device mesh, in memory on an 8-device mesh."""
    import jax

    from jmerge import sharding as shd
    from jmerge.engine import merge
    assert jax.device_count() == 8, jax.devices()
    mesh8 = shd.make_mesh({"data": 1, "fsdp": 8, "tensor": 1}, devices=jax.devices()[:8])
    modes = {"stream": dict(mode="stream"), "memory, 1 device": dict(mode="memory"),
             "memory, 8 devices": dict(mode="memory", mesh=mesh8)}
    results = {}
    for name in METHODS:
        try:
            cfg = engine_config(registry.METHODS[name], dirs, work)
            res = {}
            for i, (mode, kw) in enumerate(modes.items()):
                out = work / f"{name}-{i}"
                merge(cfg, out, seed=0, **kw)
                res[mode] = {f.name: hashlib.sha256(f.read_bytes()).hexdigest()
                             for f in sorted(out.glob("*.safetensors"))}
            results[name] = res
        except Exception as e:  # reported by that method's test, the others go on
            results[name] = {"error": f"{type(e).__name__}: {e}"}
    return results


def checkpoints(root: Path, n: int = 3) -> list[str]:
    """n tiny llama checkpoints (seeds 0..n-1), every weight random, the norms' too."""
    import torch
    from transformers import AutoModelForCausalLM

    from conftest import tiny_hf_config
    out = []
    for seed in range(n):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(tiny_hf_config("llama", **SMALL), dtype=torch.float32)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
        model.save_pretrained(root / f"m{seed}")
        out.append(str(root / f"m{seed}"))
    return out


@pytest.fixture(scope="module", autouse=True)
def engine_run(request, tmp_path_factory):
    """The engine subprocess, started with the module's first test (when its test is selected)."""
    if not any(getattr(it, "originalname", None) == ENGINE_TEST for it in request.session.items):
        yield None
        return
    work = tmp_path_factory.mktemp("contract")
    args = checkpoints(tmp_path_factory.mktemp("contract-models"))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(Path(jmerge.__file__).resolve().parent.parent),
                                           os.environ.get("PYTHONPATH", "")]))
    log = open(work / "log.txt", "w")
    proc = subprocess.Popen([sys.executable, __file__, str(work), *args], env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    yield proc, work
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    log.close()


@pytest.fixture(scope="module")
def engine_results(engine_run):
    proc, work = engine_run
    try:
        rc = proc.wait(timeout=900)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = "timeout"
    result = work / "results.json"
    if rc != 0 or not result.exists():
        tail = (work / "log.txt").read_text()[-4000:]
        pytest.fail(f"engine subprocess failed ({rc}):\n{tail}")
    return json.loads(result.read_text())


@pytest.mark.parametrize("name", METHODS)
def test_stream_and_memory_same_bytes(name, engine_results):
    res = engine_results[name]
    assert "error" not in res, res.get("error")
    stream = res["stream"]
    assert stream, f"{name}: no safetensors written"
    for mode, d in res.items():
        assert d == stream, f"{name}: {mode} differs from stream"


if __name__ == "__main__":  # the engine subprocess: WORK DIR...
    work_dir = Path(sys.argv[1])
    (work_dir / "results.json").write_text(json.dumps(engine_worker(sys.argv[2:], work_dir), indent=1))
