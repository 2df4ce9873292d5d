"""The per-tensor program both merge modes run, and how streaming gets it compiled early and
cheaply: ahead of use on background threads (`precompile`), its traced form kept across runs
in an exported-program cache (`compile_exported`)."""

from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import os
from pathlib import Path

import jax
import numpy as np

from jmerge.engine.finite import all_finite
from jmerge.engine.jobs import TensorJob
from jmerge.engine.keys import tensor_key
from jmerge.engine.prepare import Prepared, job_params, realigned


def per_tensor(method, static: tuple, out_dtype, base, models, key, params):
    """The method on one tensor cast to the output dtype, plus whether each input, and last the
    output, is finite: one reduction in the same program, so the output is checked without a
    second pass over it."""
    out = method.fn(base, list(models), key=key if method.stochastic else None, **params, **dict(static))
    out = out.astype(out_dtype)
    inputs = ([base] if base is not None else []) + list(models)
    return out, all_finite(inputs + [out])


@functools.lru_cache(maxsize=None)
def jitted_tensor_fn(method_name: str, static: tuple, out_dtype: np.dtype):
    from jmerge.merge import get
    return jax.jit(functools.partial(per_tensor, get(method_name), static, out_dtype))


def signature(static: tuple, arrays, dyn: dict):
    """What a compiled per-tensor program is specific to: static parameters, input shapes and
    dtypes, and the structure of the traced parameters."""
    return (static, tuple((tuple(np.shape(x)), np.dtype(x.dtype).name) for x in arrays),
            jax.tree.structure(dyn))


def input_specs(p: Prepared, job: TensorJob) -> list[jax.ShapeDtypeStruct] | None:
    """Shape and dtype of each array job_inputs will return, from the safetensors headers.

    None where that needs reading: vocabulary-aligned embeddings, and sources other than plain
    safetensors files (a GGUF source learns a dtype by dequantizing, an adapter adds a delta).
    """
    if realigned(p, job):
        return None
    sources = [p.checked.models[r].source for r in job.inputs]
    if not all(src.reads_into for src in sources):
        return None
    return [jax.ShapeDtypeStruct(tuple(src.shape(n)), p.compute_dtype or np.dtype(src.dtype(n)))
            for src, n in zip(sources, job.in_names)]


def precompile(p: Prepared, jobs: list[TensorJob], seed: int, cache: Path | None, workers: int = 2) -> dict:
    """Compile the per-tensor function for every distinct input signature of `jobs`, in the
    background on `workers` threads, in order of first use: {signature: Future[executable]}.
    `cache`: the exported-program cache directory (None: trace every program).

    XLA compiles one function on one core; streaming would otherwise compile each new shape
    only when it reaches it, one after the other. A signature predicted wrongly is never looked
    up (the caller matches the arrays it actually read), so it costs only its compile time.
    """
    plan = p.checked.plan
    ahead = concurrent.futures.ThreadPoolExecutor(workers)
    out: dict = {}
    for job in jobs:
        specs = input_specs(p, job)
        dyn, static = job_params(job, plan.static_params, p.masks)
        if specs is None or any(k in dyn for k in p.masks.names):
            continue
        sig = signature(static, specs, dyn)
        if sig in out:
            continue
        fn = jitted_tensor_fn(plan.method.name, static, p.out_dtype)
        key = tensor_key(seed, job.out_name) if plan.method.stochastic else None
        base, models = job.split(specs)
        what = (plan.method.name, static, np.dtype(p.out_dtype).name)
        out[sig] = ahead.submit(compile_exported, fn, (base, models, key, dyn), what, cache)
    ahead.shutdown(wait=False)
    return out


@functools.lru_cache(maxsize=1)
def _code_version() -> str:
    """jax, the device kind and jmerge's merge code (the engine and the methods): what an
    exported program depends on."""
    h = hashlib.sha256(f"{jax.__version__}|{jax.devices()[0].platform}|{jax.devices()[0].device_kind}".encode())
    engine = Path(__file__).parent
    for f in [*sorted(engine.glob("*.py")), *sorted((engine.parent / "merge").glob("*.py"))]:
        h.update(f.read_bytes())
    return h.hexdigest()


def compile_exported(fn, args: tuple, what: tuple, cache: Path | None):
    """fn compiled for args, its traced program reused across runs through the directory `cache`
    (None: traced every time).

    Tracing and lowering a TIES tensor function costs ~0.2 s of Python per shape — more than a
    whole 135M merge spends merging; the compile itself is a hit in XLA's persistent cache. So
    the lowered program is kept as a `jax.export` artifact (a versioned StableHLO format) keyed by
    the code, the method and the argument shapes; calling a deserialized one traces only a
    wrapper. Anything unreadable or unexportable falls back to tracing fn.
    """
    if cache is None:
        return fn.lower(*args).compile()
    shapes = jax.tree.map(lambda a: (tuple(np.shape(a)), str(a.dtype)), args)
    key = hashlib.sha256(repr((_code_version(), what, shapes, jax.tree.structure(args))).encode()).hexdigest()
    try:
        exported = _exported(fn, args, Path(cache) / f"{what[0]}-{key[:32]}.jax")
        return jax.jit(exported.call).lower(*args).compile()
    except Exception:  # e.g. an argument type jax.export cannot serialize
        return fn.lower(*args).compile()


def _exported(fn, args: tuple, path: Path):
    """The program stored at path, or fn exported for args and stored there."""
    from jax import export
    try:
        return export.deserialize(bytearray(path.read_bytes()))
    except Exception:  # absent, partly written by a crash, or from another jax: export afresh
        pass
    exported = export.export(fn)(*args)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(exported.serialize())
    tmp.replace(path)
    return exported
