"""The streaming merge: for each output tensor, its inputs read from the files (no memory map
kept), merged by the per-tensor program, written straight into the output safetensors file.
Peak memory is a few tensors."""

from __future__ import annotations

import concurrent.futures
import json
from pathlib import Path

import numpy as np

from jmerge import distributed
from jmerge.engine.finite import flag_rows, refuse_nonfinite, refuse_nonfinite_output
from jmerge.engine.inputs import plan_inputs
from jmerge.engine.jobs import TensorJob
from jmerge.engine.keys import tensor_key
from jmerge.engine.options import MergeOptions
from jmerge.engine.prepare import Prepared, job_inputs, job_params
from jmerge.engine.programs import jitted_tensor_fn, precompile, signature
from jmerge.errors import JmergeError
from jmerge.io import hf
from jmerge.io.atomic import atomic_dir
from jmerge.progress import bar as progress_bar


def stream_merge(p: Prepared, out: Path, options: MergeOptions) -> Path:
    """Tensor by tensor from the input files to the output files. With several processes each
    merges and writes its own whole output files (`hf.deal_shards`), into the one temporary
    directory; the layout, the index and every byte are those of a single process's merge."""
    plan = p.checked.plan
    seed = options.seed
    static_names = plan.static_params
    layout = hf.hf_layout(p.out_cfg)
    items = [(n, p.out_dtype, s) for n, s in layout.items()]
    files = hf.shard_files(items, options.max_shard_size)
    mine = [f for f, k in zip(files, hf.deal_shards(files, distributed.count())) if k == distributed.index()]
    names = [n for _, shard in mine for n, _, _ in shard]
    position = {n: i for i, n in enumerate(layout)}
    # One process stops at the first non-finite output. A process with a share cannot: another
    # share may hold a non-finite input, and then the error names every input (refuse_nonfinite).
    stop_early = distributed.count() == 1 and not p.allow_nonfinite
    bad: list[tuple[int, str]] = []
    bad_out: list[tuple[int, str]] = []
    bar = progress_bar(len(names), options.progress, "merge")
    pool = concurrent.futures.ThreadPoolExecutor(1)
    compiled = precompile(p, [p.jobs[n] for n in names], seed, options.export_cache)

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
        at = position[job.out_name]
        bad.extend((at, f"{r}: {n}") for ok, r, n in zip(ins, job.inputs, job.in_names) if not ok)
        if not out_ok:
            bad_out.append((at, job.out_name))
            if stop_early and not bad:
                refuse_nonfinite_output(p, [job.out_name])  # the first one: no point writing the rest
        bar.update(1)
        return y

    def results():
        # Pipelined: read tensor i+1 (thread) and write tensor i-1 while tensor i merges.
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

    try:
        with atomic_dir(out, options.force, inputs=plan_inputs(plan)) as tmp:
            error = None
            try:
                hf.write_files(tmp, mine, results())
            except JmergeError as e:
                error = e
            distributed.raise_any("merged shares", error)
            found = distributed.gather("non-finite tensors", json.dumps({"inputs": bad, "outputs": bad_out}))
            refuse_nonfinite(p, [json.loads(f) for f in found])
            if distributed.is_lead():
                hf.write_index(tmp, items, files)
                hf.write_config(tmp, p.out_cfg, p.out_dtype)
                p.write_extras(tmp)
    finally:
        pool.shutdown(wait=True)
        for f in compiled.values():
            f.cancel()
    return out
