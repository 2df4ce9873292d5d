"""The streaming merge: for each output tensor, its inputs read from the files (no memory map
kept), merged by the per-tensor program, written straight into the output safetensors file.
Peak memory is a few tensors."""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

import numpy as np

from jmerge.engine.finite import flag_rows, refuse_nonfinite_inputs, refuse_nonfinite_output
from jmerge.engine.inputs import plan_inputs
from jmerge.engine.jobs import TensorJob
from jmerge.engine.keys import tensor_key
from jmerge.engine.options import MergeOptions
from jmerge.engine.prepare import Prepared, job_inputs, job_params
from jmerge.engine.programs import jitted_tensor_fn, precompile, signature
from jmerge.io import hf
from jmerge.io.atomic import atomic_dir
from jmerge.progress import bar as progress_bar


def stream_merge(p: Prepared, out: Path, options: MergeOptions) -> Path:
    """Tensor by tensor from the input files to the output files."""
    plan = p.checked.plan
    seed = options.seed
    static_names = plan.static_params
    layout = hf.hf_layout(p.out_cfg)
    items = [(n, p.out_dtype, s) for n, s in layout.items()]
    bad: list[str] = []
    bad_out: list[str] = []
    bar = progress_bar(len(items), options.progress, "merge")
    pool = concurrent.futures.ThreadPoolExecutor(1)
    compiled = precompile(p, [p.jobs[n] for n in layout], seed, options.export_cache)

    def compute(job: TensorJob, xs: list[np.ndarray]):
        dyn, static = job_params(job, static_names, p.masks)
        fn = jitted_tensor_fn(plan.method.name, static, p.out_dtype)
        key = tensor_key(seed, job.out_name) if plan.method.stochastic else None
        base, models = job.split(xs)
        ready = compiled.get(signature(static, xs, dyn))
        return (ready.result() if ready is not None else fn)(base, models, key, dyn)

    def finish(job: TensorJob, y, finite):
        y = np.asarray(y)
        ins, out_ok = flag_rows(finite)
        bad.extend(f"{r}: {n}" for ok, r, n in zip(ins, job.inputs, job.in_names) if not ok)
        if not out_ok:
            bad_out.append(job.out_name)
            if not bad and not p.allow_nonfinite:
                refuse_nonfinite_output(p, bad_out)  # the first one: no point writing the rest
        bar.update(1)
        return y

    def results():
        # Pipelined: read tensor i+1 (thread) and write tensor i-1 while tensor i merges.
        names = list(layout)
        nxt = pool.submit(job_inputs, p, p.jobs[names[0]])
        pending = None
        for i, name in enumerate(names):
            job = p.jobs[name]
            xs = nxt.result()
            if i + 1 < len(names):
                nxt = pool.submit(job_inputs, p, p.jobs[names[i + 1]])
            current = (job, *compute(job, xs))
            del xs
            if pending is not None:
                yield finish(*pending)
            pending = current
        yield finish(*pending)
        bar.close()

    stream = results()
    try:
        with atomic_dir(out, options.force, inputs=plan_inputs(plan)) as tmp:
            hf.write_shards(tmp, items, stream, options.max_shard_size)
            refuse_nonfinite_inputs(p, bad)
            refuse_nonfinite_output(p, bad_out)
            hf.write_config(tmp, p.out_cfg, p.out_dtype)
            p.write_extras(tmp)
    finally:
        pool.shutdown(wait=True)
        for f in compiled.values():
            f.cancel()
    return out
