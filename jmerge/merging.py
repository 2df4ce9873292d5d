"""The merge engine: a checked plan -> an HF directory, in memory or streamed tensor by tensor.

Both modes call the same per-tensor function (`method.fn` on one HF tensor's inputs) with the
same float32 parameter values and the same key, so they write the same bits:

- in memory: every input model is loaded onto the mesh. One jitted program merges the non-layer
  tensors, and the stacked layer leaves of elementwise methods (vmapped over the layers).
  A method that reduces over each tensor (TIES, DARE, SLERP, ...) is called once per layer
  instead, on that layer's buffers: vmap would let XLA order the reductions over a batched
  tensor differently (1-ulp differences in DARE's L1 rescale), and streaming must match bit for
  bit; a lax.map over the layers is ~4x slower on XLA:CPU. The layer axis is the only axis the
  merge is split on (shard_map), so no reduction inside a tensor depends on the mesh shape.
- streaming: for each output tensor, the inputs are read from the files (no memory map kept),
  merged by the per-tensor function jitted once per shape, and written straight into the output
  safetensors file. Peak memory is a few tensors.

Randomness: key = fold_in(key(seed), first 4 bytes of sha256(output tensor name)), independent
of order, mode and sharding.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import operator
import os
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jmerge import sharding as shd
from jmerge.check import Checked, ModelInput, check_plan, out_config
from jmerge.config import ModelConfig
from jmerge.errors import JmergeError, collect
from jmerge.io import hf
from jmerge.io.atomic import atomic_dir, check_target
from jmerge.plan import Job, MergePlan, load_plan

EMBED_NAMES = ("model.embed_tokens.weight", "lm_head.weight")
# Streaming is chosen when the inputs would take more than this share of available memory.
STREAM_FRACTION = 0.45


# ---------------------------------------------------------------------------- keys, calls

def name_hash(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")


def tensor_key(seed: int, name: str) -> jax.Array:
    return jax.random.fold_in(jax.random.key(seed), np.uint32(name_hash(name)))


def per_tensor(method, static: tuple, out_dtype, base, models, key, params):
    """The method on one tensor cast to the output dtype, plus whether each input, and last the
    output, is finite: one reduction in the same program, so the output is checked without a
    second pass over it."""
    out = method.fn(base, list(models), key=key if method.random else None, **params, **dict(static))
    out = out.astype(out_dtype)
    inputs = ([base] if base is not None else []) + list(models)
    return out, all_finite(inputs + [out])


def all_finite(xs: list) -> jax.Array:
    """[whether xs[i] has no NaN/Inf], in one read of all the inputs (separate `all` reductions
    are ~10x slower on XLA:CPU: 84 ms against 6 ms for three 28M-entry bf16 tensors)."""
    from jmerge.merge._sparsify import reduce_each
    xs = [jnp.asarray(x) for x in xs]
    if len({x.shape for x in xs}) != 1:
        return jnp.stack([jnp.all(jnp.isfinite(x)) for x in xs])
    return jnp.stack(reduce_each([jnp.isfinite(x) for x in xs], True, operator.and_, tuple(range(xs[0].ndim))))


@functools.lru_cache(maxsize=None)
def jitted_tensor_fn(method_name: str, static: tuple, out_dtype: np.dtype):
    from jmerge.merge import get
    return jax.jit(functools.partial(per_tensor, get(method_name), static, out_dtype))


def job_params(job: Job, static_names: frozenset, masks: "MaskFiles") -> tuple[dict, tuple]:
    """(traced parameters as float32 scalars / tuples, static parameters as a sorted tuple)."""
    dyn, static = {}, {}
    for k, v in job.params.items():
        if k in static_names:
            static[k] = v[0] if isinstance(v, tuple) else v
        elif k == "mask":
            dyn[k] = tuple(masks.get(path, job.out_name) for path in v)
        elif isinstance(v, tuple):  # counts from a method's host_params stay integers
            dyn[k] = tuple(x if isinstance(x, np.integer) else np.float32(x) for x in v)
        else:
            dyn[k] = v if isinstance(v, np.integer) else np.float32(v)
    return dyn, tuple(sorted(static.items()))


def with_host_params(method, job: Job, shape) -> Job:
    """The job plus the parameters its method computes on the host from the planned values and
    the tensor's size (`fn.host_params(params, n)`: mergekit's exact kept counts for densities,
    which float32 cannot reproduce once traced)."""
    hook = getattr(method.fn, "host_params", None)
    if hook is None or shape is None:
        return job
    return dataclasses.replace(job, params={**job.params, **hook(job.params, int(np.prod(shape)))})


class MaskFiles:
    """somf masks: a per-model parameter naming a safetensors file keyed by output tensor name."""

    def __init__(self, config_dir: Path):
        self.dir, self.open = config_dir, {}

    def get(self, path: str, name: str) -> np.ndarray:
        from jmerge.check import locate
        from jmerge.io.safetensors_io import Checkpoint
        if path not in self.open:
            self.open[path] = Checkpoint(locate(path, self.dir))
        ck = self.open[path]
        if name not in ck.where:
            raise JmergeError(f"mask file {path} has no tensor {name}")
        return np.asarray(ck.array(name), np.float32)


# ---------------------------------------------------------------------------- tokenizer

@dataclasses.dataclass
class TokenizerPlan:
    vocab: dict[str, int]  # output token -> id
    rows: int  # output embedding rows
    perms: dict[str, np.ndarray]  # model -> source row per output row (-1: the model lacks it)
    save: Any  # callable(out_dir)
    changed: bool  # whether any model's embedding rows must be rearranged
    vocabs: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)  # each model's own
    tokens: dict = dataclasses.field(default_factory=dict)  # plan.tokens: token -> TokenSource


def plan_tokenizer(c: Checked) -> TokenizerPlan | None:
    plan = c.plan
    if plan.tokenizer_source is None:
        return None
    vocabs = {ref: m.vocab() for ref, m in c.models.items()}
    if plan.tokenizer_source == "union":
        from transformers import AutoTokenizer
        first = plan.base_model or c.ref_model
        tok = AutoTokenizer.from_pretrained(str(c.models[first].tokenizer_dir))
        have = set(tok.get_vocab())
        extra = [t for ref in c.models for t, _ in sorted(vocabs[ref].items(), key=lambda kv: kv[1])
                 if t not in have]
        # tokenizer.tokens names tokens the output must have: mergekit adds them after the union
        extra = list(dict.fromkeys(extra + [t for t in plan.tokens if t not in have]))
        if extra:
            tok.add_tokens(extra)
        vocab = tok.get_vocab()
        save = lambda out: tok.save_pretrained(str(out))  # noqa: E731
    else:
        src = plan.base_model if plan.tokenizer_source == "base" else plan.tokenizer_source
        vocab = vocabs[src]
        save = c.models[src].write_tokenizer
        new = [t for t in plan.tokens if t not in vocab]
        if new:
            from transformers import AutoTokenizer
            tok = AutoTokenizer.from_pretrained(str(c.models[src].tokenizer_dir))
            tok.add_tokens(new)
            vocab = tok.get_vocab()
            save = lambda out: tok.save_pretrained(str(out))  # noqa: E731
    rows = max(vocab.values()) + 1
    if plan.pad_to_multiple_of:
        rows = -(-rows // plan.pad_to_multiple_of) * plan.pad_to_multiple_of
    perms, changed = {}, False
    for ref, m in c.models.items():
        p = np.full(rows, -1, np.int64)
        for t, i in vocab.items():
            j = vocabs[ref].get(t, -1)
            p[i] = j if j < m.cfg.vocab_size else -1
        perms[ref] = p
        changed |= not (rows == m.cfg.vocab_size and np.array_equal(p, np.arange(rows)))
    return TokenizerPlan(vocab, rows, perms, save, changed or bool(plan.tokens), vocabs, dict(plan.tokens))


def permute_embeddings(arrays: dict[str, np.ndarray], tp: TokenizerPlan, base: str | None) -> dict[str, np.ndarray]:
    """Rearrange each model's embedding rows into the output vocabulary (mergekit semantics):
    a row a model lacks is filled from the only model that has the token, else from the base,
    else with the mean over the models that have it; a token nobody has gets zeros. A token of
    `tokenizer.tokens` takes its source's row instead, where a model lacks it or (`force`) in
    every model. Padding rows (pad_to_multiple_of) get the mean of each model's token rows."""
    refs = list(arrays)
    perms = np.stack([tp.perms[r] for r in refs])  # [models, rows]
    present = perms >= 0
    count = present.sum(0)
    width = next(iter(arrays.values())).shape[1]
    dtype = next(iter(arrays.values())).dtype
    gathered = np.zeros((len(refs), tp.rows, width), np.float32)
    for k, r in enumerate(refs):
        ok = present[k]
        gathered[k, ok] = arrays[r][perms[k, ok]].astype(np.float32)
    fill = np.zeros((tp.rows, width), np.float32)
    mean = gathered.sum(0) / np.maximum(count, 1)[:, None]
    fill[count > 1] = mean[count > 1]
    only = count == 1
    fill[only] = gathered[present.argmax(0)[only], np.nonzero(only)[0]]
    if base is not None and base in refs:
        b = refs.index(base)
        from_base = (count > 1) & present[b]
        fill[from_base] = gathered[b, from_base]
    forced = np.zeros(tp.rows, bool)
    for tok, ts in tp.tokens.items():
        i = tp.vocab[tok]
        if ts.force or not present[:, i].all():
            fill[i] = token_row(tok, ts, i, arrays, tp, [r for k, r in enumerate(refs) if not present[k, i]])
            forced[i] = ts.force
    pad = np.ones(tp.rows, bool)
    pad[list(tp.vocab.values())] = False
    out = {}
    for k, r in enumerate(refs):
        rows = np.where((present[k] & ~forced)[:, None], gathered[k], fill)
        if pad.any():  # as mergekit pads (after Hewitt's vocabulary expansion note)
            rows[pad] = rows[~pad].mean(0)
        out[r] = rows.astype(dtype)
    return out


def token_row(tok: str, ts, i: int, arrays: dict[str, np.ndarray], tp: TokenizerPlan,
              lacking: list[str]) -> np.ndarray:
    """The embedding row `tokenizer.tokens[tok]` names (output row i), as float32."""
    where = f"tokenizer.tokens[{tok!r}]"
    width = next(iter(arrays.values())).shape[1]
    if ts.kind == "zero":
        return np.zeros(width, np.float32)
    if ts.kind is None:
        why = f"{', '.join(lacking)} lack(s) it" if lacking else "force is on"
        raise JmergeError(f"{where} needs a source: {why}")
    if ts.model not in arrays:
        raise JmergeError(f"{where}: source model {ts.model} is not an input of this embedding "
                          f"(inputs: {', '.join(arrays)})")
    src = arrays[ts.model]
    if ts.kind == "model":
        j = int(tp.perms[ts.model][i])
        if j < 0:
            raise JmergeError(f"{where}: source model {ts.model} has no token {tok!r}")
    elif ts.token_id is not None:
        j = ts.token_id
    else:
        j = (tp.vocabs.get(ts.model) or {}).get(ts.token, -1)
        if j < 0:
            raise JmergeError(f"{where}: {ts.model} has no token {ts.token!r}")
    if not 0 <= j < src.shape[0]:
        raise JmergeError(f"{where}: token id {j} is out of range for {ts.model} ({src.shape[0]} rows)")
    return src[j].astype(np.float32)


# ---------------------------------------------------------------------------- chat template

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
          " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
          "{% endif %}")
BUILTIN_TEMPLATES = {"chatml": CHATML}


def _template_of(d: Path | None) -> str | None:
    if d is None:
        return None
    if (d / "chat_template.jinja").exists():
        return (d / "chat_template.jinja").read_text()
    f = d / "tokenizer_config.json"
    if f.exists():
        t = json.loads(f.read_text()).get("chat_template")
        return t if isinstance(t, str) else None
    return None


def resolve_chat_template(c: Checked) -> str | None:
    setting = c.plan.chat_template
    if setting is None:
        return None
    if setting == "auto":
        found = [t for t in (_template_of(m.tokenizer_dir) for m in c.models.values()) if t]
        return Counter(found).most_common(1)[0][0] if found else None
    if setting in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[setting]
    if "{%" in setting or "{{" in setting:
        return setting
    raise JmergeError(f"chat_template {setting!r}: not 'auto', a built-in ({', '.join(BUILTIN_TEMPLATES)}) "
                      "or a Jinja template")


def write_chat_template(out: Path, template: str) -> None:
    (out / "chat_template.jinja").write_text(template)
    f = out / "tokenizer_config.json"
    if f.exists():
        conf = json.loads(f.read_text())
        if "chat_template" in conf:
            conf["chat_template"] = template
            f.write_text(json.dumps(conf, indent=2, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------- the merge

@dataclasses.dataclass
class Prepared:
    checked: Checked
    out_cfg: ModelConfig
    out_dtype: np.dtype
    compute_dtype: np.dtype | None
    tokenizer: TokenizerPlan | None
    chat_template: str | None
    jobs: dict[str, Job]
    masks: MaskFiles
    # jitted in-memory merge per mesh: re-merging with new parameter values reuses it
    compiled: dict = dataclasses.field(default_factory=dict)
    allow_nonfinite: bool = False  # write NaN/Inf inputs and outputs instead of refusing them
    warnings: list[str] = dataclasses.field(default_factory=list)

    def write_extras(self, out: Path) -> None:
        c = self.checked
        if self.tokenizer is not None:
            self.tokenizer.save(out)
        else:
            c.models[c.ref_model].write_tokenizer(out)
        if self.chat_template:
            write_chat_template(out, self.chat_template)


def prepare(c: Checked) -> Prepared:
    plan = c.plan
    tp = plan_tokenizer(c)
    ref = c.models[c.ref_model]
    out_dtype = (_np_dtype(plan.out_dtype) if plan.out_dtype
                 else np.dtype(ref.source.dtype("model.embed_tokens.weight")))
    out_cfg = out_config(plan, c.models, c.ref_model, c.resolved, tp.rows if tp else None, out_dtype.name)
    layout = hf.hf_layout(out_cfg)
    jobs = {j.out_name: with_host_params(plan.method, j, layout.get(j.out_name)) for j in c.resolved.jobs}
    return Prepared(c, out_cfg, out_dtype, _np_dtype(plan.dtype) if plan.dtype else None, tp,
                    resolve_chat_template(c), jobs, MaskFiles(Path(plan.path).resolve().parent))


def _np_dtype(name: str) -> np.dtype:
    import ml_dtypes
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def aligned_empty(shape, dtype, align: int = 64) -> np.ndarray:
    """np.empty on an `align`-byte boundary. XLA:CPU takes such a host array as it is; numpy's
    own 16-byte alignment makes every call copy its inputs first (measured: 93 ms against
    53 ms for a merge of two 28M-entry bf16 tensors)."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + align, np.uint8)
    start = -raw.ctypes.data % align
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def read_tensor(m: ModelInput, name: str, dtype: np.dtype | None) -> np.ndarray:
    """One whole tensor, read (not memory-mapped) so that no file pages stay mapped."""
    src = m.source
    if hasattr(src, "read_into"):
        buf = aligned_empty(src.shape(name), src.dtype(name))
        src.read_into(name, (slice(None),), buf)
    else:
        buf = np.asarray(src.array(name))
    if dtype is None or buf.dtype == dtype:
        return buf
    out = aligned_empty(buf.shape, dtype)
    out[...] = buf
    return out


def embedding_inputs(p: Prepared, job: Job) -> dict[str, np.ndarray]:
    """The (vocabulary-aligned) embedding / lm_head rows of every model feeding `job`."""
    c = p.checked
    refs = list(dict.fromkeys(([job.base] if job.base else []) + list(job.models)))
    base = c.plan.slices[job.slice].base_model or c.plan.base_model
    extra = [base] if base and base not in refs and base in c.models else []
    arrays = {r: read_tensor(c.models[r], _embed_name(c.models[r], job.out_name), p.compute_dtype)
              for r in refs + extra}
    out = permute_embeddings(arrays, p.tokenizer, base)
    return {r: out[r] for r in refs}


def _embed_name(m: ModelInput, name: str) -> str:
    # a tied model has no lm_head: its embedding is the head
    if name == "lm_head.weight" and m.cfg.tie_word_embeddings:
        return "model.embed_tokens.weight"
    return name


def job_inputs(p: Prepared, job: Job) -> list[np.ndarray]:
    refs = ([job.base] if job.base else []) + list(job.models)
    if p.tokenizer is not None and p.tokenizer.changed and job.out_name in EMBED_NAMES:
        arrays = embedding_inputs(p, job)
        return [arrays[r] for r in refs]
    return [read_tensor(p.checked.models[r], n, p.compute_dtype) for r, n in zip(refs, job.in_names)]


def _split(job: Job, xs: list) -> tuple[Any, list]:
    return (xs[0], xs[1:]) if job.base else (None, xs)


def _nonfinite_inputs(p: "Prepared", bad: list[str]) -> None:
    """Refuse NaN/Inf inputs, listing them all, or (allowed) note them as a warning."""
    if not bad:
        return
    if not p.allow_nonfinite:
        collect([f"{b} has NaN/Inf values" for b in bad],
                "non-finite input weights (pass --allow-nonfinite to merge anyway); nothing was written")
    more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
    p.warnings.append(f"input {bad[0]}{more} has NaN/Inf values (merged: --allow-nonfinite)")


def _nonfinite_output(p: "Prepared", names: list[str]) -> None:
    """Refuse a merge whose result overflowed to NaN/Inf, or (allowed) note it as a warning."""
    if not names:
        return
    more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
    if not p.allow_nonfinite:
        raise JmergeError(f"the merged {names[0]}{more} has NaN/Inf values (pass --allow-nonfinite "
                          "to write it anyway); nothing was written")
    p.warnings.append(f"the merged {names[0]}{more} has NaN/Inf values (written: --allow-nonfinite)")


def _flag_rows(flags) -> tuple[np.ndarray, bool]:
    """(finiteness of each input, of the output) from per_tensor's flags."""
    flags = np.asarray(flags)
    return flags[:-1], bool(flags[-1])


def stream_merge(p: Prepared, out: Path, *, seed: int, force: bool, max_shard_size="5GB",
                 progress: bool = False) -> Path:
    """Tensor by tensor from the input files to the output files."""
    plan = p.checked.plan
    static_names = plan.static_params
    layout = hf.hf_layout(p.out_cfg)
    items = [(n, p.out_dtype, s) for n, s in layout.items()]
    bad: list[str] = []
    bad_out: list[str] = []
    bar = hf._bar(len(items), progress, "merge")
    pool = concurrent.futures.ThreadPoolExecutor(1)
    compiled = precompile(p, [p.jobs[n] for n in layout], seed)

    def compute(job: Job, xs: list[np.ndarray]):
        dyn, static = job_params(job, static_names, p.masks)
        fn = jitted_tensor_fn(plan.method.name, static, p.out_dtype)
        key = tensor_key(seed, job.out_name) if plan.method.random else None
        base, models = _split(job, xs)
        ready = compiled.get(_signature(static, xs, dyn))
        return (ready.result() if ready is not None else fn)(base, models, key, dyn)

    def finish(job, y, finite):
        y = np.asarray(y)
        refs = ([job.base] if job.base else []) + list(job.models)
        ins, out_ok = _flag_rows(finite)
        bad.extend(f"{r}: {n}" for ok, r, n in zip(ins, refs, job.in_names) if not ok)
        if not out_ok:
            bad_out.append(job.out_name)
            if not bad and not p.allow_nonfinite:
                _nonfinite_output(p, bad_out)  # the first one: no point writing the rest
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
        with atomic_dir(out, force, inputs=plan_inputs(plan)) as tmp:
            hf.write_shards(tmp, items, stream, max_shard_size)
            _nonfinite_inputs(p, bad)
            _nonfinite_output(p, bad_out)
            hf.write_config(tmp, p.out_cfg, p.out_dtype)
            p.write_extras(tmp)
    finally:
        pool.shutdown(wait=True)
        for f in compiled.values():
            f.cancel()
    return out


def _signature(static: tuple, arrays, dyn: dict):
    return (static, tuple((tuple(np.shape(x)), np.dtype(x.dtype).name) for x in arrays),
            jax.tree.structure(dyn))


def input_specs(p: Prepared, job: Job) -> list[jax.ShapeDtypeStruct] | None:
    """Shape and dtype of each array job_inputs will return, from the safetensors headers.

    None where that needs reading: vocabulary-aligned embeddings, and sources other than plain
    safetensors files (a GGUF source learns a dtype by dequantizing, an adapter adds a delta).
    """
    if p.tokenizer is not None and p.tokenizer.changed and job.out_name in EMBED_NAMES:
        return None
    refs = ([job.base] if job.base else []) + list(job.models)
    sources = [p.checked.models[r].source for r in refs]
    if not all(hasattr(src, "read_into") for src in sources):
        return None
    return [jax.ShapeDtypeStruct(tuple(src.shape(n)), p.compute_dtype or np.dtype(src.dtype(n)))
            for src, n in zip(sources, job.in_names)]


def precompile(p: Prepared, jobs: list[Job], seed: int, workers: int = 2) -> dict:
    """Compile the per-tensor function for every distinct input signature of `jobs`, in the
    background on `workers` threads, in order of first use: {signature: Future[executable]}.

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
        if specs is None or "mask" in dyn:
            continue
        sig = _signature(static, specs, dyn)
        if sig in out:
            continue
        fn = jitted_tensor_fn(plan.method.name, static, p.out_dtype)
        key = tensor_key(seed, job.out_name) if plan.method.random else None
        base, models = _split(job, specs)
        what = (plan.method.name, static, np.dtype(p.out_dtype).name)
        out[sig] = ahead.submit(compile_exported, fn, (base, models, key, dyn), what)
    ahead.shutdown(wait=False)
    return out


# Where `compile_exported` keeps traced programs; None (the default) traces every time. The merge
# command sets it beside XLA's persistent compilation cache.
EXPORT_CACHE: Path | None = None


@functools.lru_cache(maxsize=1)
def _code_version() -> str:
    """jax, the device kind and jmerge's merge code: what an exported program depends on."""
    h = hashlib.sha256(f"{jax.__version__}|{jax.devices()[0].platform}|{jax.devices()[0].device_kind}".encode())
    for f in [Path(__file__), *sorted((Path(__file__).parent / "merge").glob("*.py"))]:
        h.update(f.read_bytes())
    return h.hexdigest()


def compile_exported(fn, args: tuple, what: tuple):
    """fn compiled for args, its traced program reused across runs through `EXPORT_CACHE`.

    Tracing and lowering a TIES tensor function costs ~0.2 s of Python per shape — more than a
    whole 135M merge spends merging; the compile itself is a hit in XLA's persistent cache. So
    the lowered program is kept as a `jax.export` artifact (a versioned StableHLO format) keyed by
    the code, the method and the argument shapes; calling a deserialized one traces only a
    wrapper. Anything unreadable or unexportable falls back to tracing fn.
    """
    if EXPORT_CACHE is None:
        return fn.lower(*args).compile()
    shapes = jax.tree.map(lambda a: (tuple(np.shape(a)), str(a.dtype)), args)
    key = hashlib.sha256(repr((_code_version(), what, shapes, jax.tree.structure(args))).encode()).hexdigest()
    try:
        exported = _exported(fn, args, EXPORT_CACHE / f"{what[0]}-{key[:32]}.jax")
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


# ---- in memory -------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Group:
    """Output tensors merged together: a non-layer tensor, or one stacked layer leaf over the
    layers of one output slice."""
    path: tuple[str, ...]  # output leaf
    names: tuple[str, ...]  # output HF names, in layer order
    layered: bool
    base: str | None
    models: tuple[str, ...]
    starts: tuple[int, ...]  # first input layer per input (base first); layered groups only
    static: tuple


def _static_only(j: Job, static_names) -> tuple:
    return tuple(sorted((k, v[0] if isinstance(v, tuple) else v)
                        for k, v in j.params.items() if k in static_names))


def build_groups(p: Prepared) -> list[Group]:
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
    params = jax.tree.map(lambda *xs: np.stack(xs), *dyn) if g.layered else dyn[0]
    keys = None
    if p.checked.plan.method.random:
        ks = [tensor_key(seed, n) for n in g.names]
        keys = jnp.stack(ks) if g.layered else ks[0]
    return params, keys


def layer_split(mesh: Mesh, n: int) -> tuple[P, int]:
    """How n layers spread over the mesh, and into how many blocks: split over every axis of
    size > 1 when they divide n (each device merges its own block), else P() (every device
    merges all of them)."""
    axes = tuple(a for a in mesh.axis_names if mesh.shape[a] > 1)
    size = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    return (P(axes), size) if axes and n % size == 0 else (P(), 1)


def on_devices(f, mesh: Mesh, in_specs, out_specs):
    """f run per device on its blocks (P(): every device computes the whole thing), so the
    partitioner never splits the inside of a tensor."""
    if mesh.size == 1:
        return f
    return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def in_one_program(method, g: Group) -> bool:
    """Whether a group is merged inside the single jitted program: a non-layer tensor, or a layer
    leaf of an elementwise method (vmapped over the layers: no float reduction to reorder, its
    finiteness flags are a logical AND, so the bits are streaming's). A method that reduces over
    each tensor is instead called layer by layer (`merge_layers`)."""
    return not g.layered or method.elementwise


def _group_inputs(inputs, g: Group, n: int | None = None) -> tuple[Any, list]:
    """(base, models) of a group: stacked layer leaves cut to its slice, or named tensors."""
    refs = ([g.base] if g.base else []) + list(g.models)
    if g.layered:
        xs = [_get(inputs[ref]["layers"], g.path[2:]) for ref in refs]
        if n is not None:
            xs = [x[a:a + n] for x, a in zip(xs, g.starts)]
    else:
        xs = [inputs[ref]["named"][g.names[0]] for ref in refs]
    return (xs[0], xs[1:]) if g.base else (None, xs)


def memory_fn(p: Prepared, groups: list[Group], mesh: Mesh):
    """The single jitted program's function for the groups `in_one_program`:
    (inputs {model: {"layers": stacked layer leaves, "named": {HF name: array}}}, per-group
    params, per-group keys) -> ([output array per group], [finiteness flags per group])."""
    from jmerge.merge import get
    method = get(p.checked.plan.method.name)

    def fn(inputs, gparams, gkeys):
        ys, finite = [], []
        for g, prm, key in zip(groups, gparams, gkeys):
            call = functools.partial(per_tensor, method, g.static, p.out_dtype)
            n = len(g.names) if g.layered else None
            base, models = _group_inputs(inputs, g, n)
            if g.layered:
                spec, _ = layer_split(mesh, n)
                y, fin = on_devices(jax.vmap(lambda a: call(*a)), mesh, (spec,), spec)((base, models, key, prm))
            else:
                y, fin = on_devices(lambda a: call(*a), mesh, (P(),), P())((base, models, key, prm))
            ys.append(y)
            finite.append(fin)
        return ys, finite

    return fn


@functools.lru_cache(maxsize=None)
def _layer_step(method_name: str, static: tuple, out_dtype: np.dtype, has_base: bool, mesh: Mesh, spec: P):
    """One jitted call merging layer i of a group (on each device, its i-th local layer).

    The layer's inputs are cut out into buffers of their own first (a barrier), so the method
    runs on exactly what streaming hands it. Measured on XLA:CPU (SmolLM2's 30 gate_proj layers,
    TIES, same load): ~4x faster called layer by layer than as one lax.map or vmap over the
    stacked leaf (~100 ms against ~400 ms: a loop body that slices its inputs is far slower than
    the same code on whole buffers); writing each layer into a donated stacked output instead of
    stacking at the end cost ~80 ms more.
    """
    from jmerge.merge import get
    method = get(method_name)

    def local(xs, i, offsets, prm, keys):
        sl = lax.optimization_barrier([lax.dynamic_index_in_dim(x, i + o, 0, keepdims=False)
                                       for x, o in zip(xs, offsets)])
        base, models = (sl[0], sl[1:]) if has_base else (None, sl)
        prm_i = jax.tree.map(lambda v: lax.dynamic_index_in_dim(v, i, 0, keepdims=False), prm)
        key = None if keys is None else lax.dynamic_index_in_dim(keys, i, 0, keepdims=False)
        y, fin = per_tensor(method, static, out_dtype, base, models, key, prm_i)
        return y[None], fin[None]

    return jax.jit(on_devices(local, mesh, (spec, P(), P(), spec, spec), (spec, spec)))


def concat_bits(xs) -> jax.Array:
    """jnp.concatenate along axis 0, done on the raw bits: XLA:CPU concatenates bfloat16 arrays
    4x slower than the same bytes as uint16 (measured: 30 x 1.7 MB, 140 ms against 33 ms)."""
    dtype = xs[0].dtype
    if dtype == jnp.bool_ or jnp.dtype(dtype).itemsize not in (1, 2, 4, 8):
        return jnp.concatenate(xs, axis=0)
    raw = jnp.dtype(f"uint{8 * jnp.dtype(dtype).itemsize}")
    return lax.bitcast_convert_type(jnp.concatenate([lax.bitcast_convert_type(x, raw) for x in xs], axis=0), dtype)


@functools.lru_cache(maxsize=None)
def _stack_blocks(mesh: Mesh, spec: P):
    """[a list of n_calls arrays of one layer per device] -> the stacked leaf in layer order (device d
    holds layers d * n_calls ...), assembled on each device from its own blocks."""
    return jax.jit(on_devices(concat_bits, mesh, (spec,), spec))


def merge_layers(p: Prepared, g: Group, mesh: Mesh, inputs, prm, keys):
    """A layered group of a method that reduces over each tensor: one call per layer (per local
    layer when the mesh splits the layers), then the layers stacked."""
    n = len(g.names)
    spec, blocks = layer_split(mesh, n)
    base, models = _group_inputs(inputs, g)
    xs = ([base] if base is not None else []) + list(models)
    offsets = np.asarray(g.starts, np.int32)
    if spec != P():  # each device needs exactly its block of this slice's layers
        xs = [jax.device_put(x[a:a + n], NamedSharding(mesh, spec)) for x, a in zip(xs, g.starts)]
        offsets = np.zeros_like(offsets)
    calls = n // blocks
    step = _layer_step(p.checked.plan.method.name, g.static, p.out_dtype, base is not None, mesh, spec)
    outs = [step(xs, np.int32(i), offsets, prm, keys) for i in range(calls)]
    stack = _stack_blocks(mesh, spec)
    return stack([y for y, _ in outs]), stack([f for _, f in outs])


@functools.lru_cache(maxsize=None)
def _assemble_fn(out_cfg: ModelConfig, paths: tuple, mesh: Mesh):
    out_sh = shd.param_shardings(_abstract(out_cfg), mesh)

    def assemble(ys):
        pieces: dict[tuple, list] = {}
        for path, y in zip(paths, ys):
            pieces.setdefault(path, []).append(y)
        out: dict = {}
        for path, parts in pieces.items():
            leaf = parts[0] if len(parts) == 1 else concat_bits(parts)
            leaf = jax.lax.with_sharding_constraint(leaf, _get(out_sh, path))
            node = out
            for k in path[:-1]:
                node = node.setdefault(k, {})
            node[path[-1]] = leaf
        return out

    return jax.jit(assemble)


def merge_arrays(p: Prepared, groups: list[Group], inputs, gparams, gkeys, mesh: Mesh, progress: bool = False):
    """(merged params pytree, [finiteness flags per group]) from inputs already on the mesh."""
    from jmerge.merge import get
    method = get(p.checked.plan.method.name)
    one = [i for i, g in enumerate(groups) if in_one_program(method, g)]
    ys, finite = [None] * len(groups), [None] * len(groups)
    if one:
        if mesh not in p.compiled:
            p.compiled[mesh] = jax.jit(memory_fn(p, [groups[i] for i in one], mesh))
        y1, f1 = p.compiled[mesh](inputs, [gparams[i] for i in one], [gkeys[i] for i in one])
        for i, y, f in zip(one, y1, f1):
            ys[i], finite[i] = y, f
    rest = [i for i, g in enumerate(groups) if not in_one_program(method, g)]
    from tqdm.auto import tqdm
    for i in tqdm(rest, desc="merge", unit="leaf", disable=not progress or not rest):
        ys[i], finite[i] = merge_layers(p, groups[i], mesh, inputs, gparams[i], gkeys[i])
    merged = _assemble_fn(p.out_cfg, tuple(g.path for g in groups), mesh)(ys)
    return merged, finite


def _abstract(cfg: ModelConfig):
    from jmerge.models.layout import abstract_params
    return abstract_params(cfg)


def load_inputs(p: Prepared, groups: list[Group], mesh: Mesh, progress: bool = False) -> dict:
    """Every input on the mesh: stacked layer leaves straight from the files; embeddings, final
    norm and lm_head by HF name (vocabulary-aligned exactly as streaming aligns them)."""
    c = p.checked
    inputs = {}
    for ref, m in c.models.items():
        params = hf.load_params(m.source, m.cfg, mesh, p.compute_dtype, allow_nonfinite=True,
                                where=m.ref, progress=progress)
        inputs[ref] = {"layers": params["model"]["layers"], "named": {}}
        del params
    for g in groups:
        if g.layered:
            continue
        job = p.jobs[g.names[0]]
        refs = ([job.base] if job.base else []) + list(job.models)
        for ref, x in zip(refs, job_inputs(p, job)):
            inputs[ref]["named"][g.names[0]] = jax.device_put(x, NamedSharding(mesh, P()))
    return inputs




def memory_params(p: Prepared, mesh: Mesh, *, seed: int, progress: bool = False):
    """The merged params pytree on the mesh (raises on non-finite inputs)."""
    groups = build_groups(p)
    inputs = load_inputs(p, groups, mesh, progress)
    gp = [group_params(p, g, seed) for g in groups]
    merged, finite = merge_arrays(p, groups, inputs, [x[0] for x in gp], [x[1] for x in gp], mesh, progress)
    bad, bad_out = [], {}
    for g, fin in zip(groups, jax.device_get(finite)):
        fin = np.asarray(fin).reshape(len(g.names), -1)
        refs = ([g.base] if g.base else []) + list(g.models)
        for row, name in zip(fin, g.names):
            ins, out_ok = _flag_rows(row)
            bad += [f"{r}: {p.jobs[name].in_names[k]}" for k, (ok, r) in enumerate(zip(ins, refs)) if not ok]
            if not out_ok:
                bad_out[name] = None
    _nonfinite_inputs(p, bad)
    # named as streaming names them: the first in the output files' order
    order = {n: i for i, n in enumerate(hf.hf_layout(p.out_cfg))}
    _nonfinite_output(p, sorted(bad_out, key=order.__getitem__))
    return merged


def memory_merge(p: Prepared, out: Path, *, seed: int, mesh: Mesh, force: bool,
                 max_shard_size="5GB", progress: bool = False):
    merged = memory_params(p, mesh, seed=seed, progress=progress)
    hf.save_hf(merged, p.out_cfg, out, max_shard_size=max_shard_size, dtype=p.out_dtype, force=force,
               progress=progress, tokenizer_writer=p.write_extras)
    return merged


# ---------------------------------------------------------------------------- entry point

def available_memory() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def choose_mode(c: Checked, mode: str) -> str:
    """On CPU streaming is both faster and smaller (measured: scripts/bench_merge.py), so `auto`
    streams there; on accelerators it merges in memory when the inputs fit."""
    if mode in ("stream", "memory"):
        return mode
    devs = jax.devices()
    if devs[0].platform == "cpu":
        return "stream"
    need = sum(m.nbytes() for m in c.models.values())
    stats = devs[0].memory_stats() or {}
    limit = min(available_memory(), stats.get("bytes_limit", 0) * len(devs))
    return "stream" if need > STREAM_FRACTION * limit else "memory"


@dataclasses.dataclass
class MergeResult:
    out: Path
    mode: str
    seconds: float
    n_tensors: int
    num_layers: int
    warnings: list[str]


def plan_inputs(plan: MergePlan) -> list[str]:
    """Every path a merge reads: the config and its models (located as check_plan locates them)."""
    from jmerge.check import locate
    config_dir = Path(plan.path).resolve().parent
    return [plan.path, *(locate(ref, config_dir) for ref in plan.referenced())]


def merge(config: str | Path | MergePlan, out: str | Path, *, mode: str = "auto", seed: int = 0,
          mesh: Mesh | None = None, force: bool = False, orbax: str | Path | None = None,
          max_shard_size="5GB", progress: bool = False, lenient: bool = False,
          allow_nonfinite: bool = False) -> MergeResult:
    """`lenient`: parameter names no merge method knows are warnings, not errors.
    `allow_nonfinite`: NaN/Inf in the inputs or the merged weights are written, with a warning."""
    t0 = time.perf_counter()
    out = Path(out)
    plan = config if isinstance(config, MergePlan) else load_plan(config, lenient=lenient)
    inputs = plan_inputs(plan)
    check_target(out, force, inputs)
    if orbax is not None:
        # written after OUT: replacing OUT, or a folder holding it, would lose it
        check_target(orbax, force, inputs, outputs=[out])
    c = check_plan(plan)
    p = prepare(c)
    p.allow_nonfinite = allow_nonfinite
    mode = choose_mode(c, mode)
    if mode == "stream":
        stream_merge(p, out, seed=seed, force=force, max_shard_size=max_shard_size, progress=progress)
    else:
        mesh = mesh or shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1})
        merged = memory_merge(p, out, seed=seed, mesh=mesh, force=force, max_shard_size=max_shard_size,
                              progress=progress)
    if orbax is not None:
        from jmerge.io import load_model, orbax_io
        if mode == "stream":
            m = load_model(out, mesh=mesh or shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}))
            merged = m.params
        orbax_io.save_orbax(merged, p.out_cfg, orbax, force=force, tokenizer_writer=lambda d: _copy_extras(out, d))
    return MergeResult(out, mode, time.perf_counter() - t0, len(c.resolved.jobs), p.out_cfg.num_layers,
                       plan.warnings + c.warnings + p.warnings)


def _copy_extras(src: Path, dst: Path) -> None:
    hf.copy_tokenizer(src, dst)
    if (src / "chat_template.jinja").exists():
        shutil.copy2(src / "chat_template.jinja", dst / "chat_template.jinja")
