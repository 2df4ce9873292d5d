"""A checked plan made ready to merge (`prepare`), and what both merge modes read through it:
each job's parameters (traced or static, host-computed counts, somf mask files) and its input
arrays (whole tensors read from the files, embeddings realigned to the output vocabulary)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from jmerge.config import ModelConfig
from jmerge.engine.inputs import Checked, ModelInput, out_config
from jmerge.engine.jobs import TensorJob
from jmerge.engine.template import resolve_chat_template, write_chat_template
from jmerge.engine.vocab import TokenizerPlan, permute_embeddings, plan_tokenizer
from jmerge.errors import JmergeError
from jmerge.io import hf
from jmerge.io.safetensors_io import Checkpoint
from jmerge.io.source import locate

EMBED_NAMES = ("model.embed_tokens.weight", "lm_head.weight")


def job_params(job: TensorJob, static_names: frozenset, masks: MaskFiles) -> tuple[dict, tuple]:
    """(traced parameters as float32 scalars / tuples, static parameters as a sorted tuple)."""
    dyn, static = {}, {}
    for k, v in job.params.items():
        if k in static_names:
            static[k] = v[0] if isinstance(v, tuple) else v
        elif masks is not None and k in masks.names:  # a `paths=` parameter (somf mask, led scores, fisher): arrays from files
            names = v if isinstance(v, tuple) else (v,)
            arrays = tuple(masks.get(path, job.out_name, k) for path in names)
            dyn[k] = arrays if isinstance(v, tuple) else arrays[0]
        elif isinstance(v, tuple):  # counts from a method's host_params stay integers
            dyn[k] = tuple(x if isinstance(x, np.integer) else np.float32(x) for x in v)
        else:
            dyn[k] = v if isinstance(v, np.integer) else np.float32(v)
    return dyn, tuple(sorted(static.items()))


def with_host_params(method, job: TensorJob, shape) -> TensorJob:
    """The job plus the parameters its method computes on the host from the planned values and
    the tensor's size (`method.host_params(params, n)`: mergekit's exact kept counts for densities,
    which float32 cannot reproduce once traced)."""
    hook = method.host_params
    if hook is None or shape is None:
        return job
    return dataclasses.replace(job, params={**job.params, **hook(job.params, int(np.prod(shape)))})


class MaskFiles:
    """Arrays of the method's `paths=` parameters (`names`: somf's mask, led's scores, fisher's
    fisher): each names a safetensors file keyed by output tensor name, or a directory of them,
    where the parameter's name picks the file (`fisher` -> fisher.safetensors). A file of an
    `optional` parameter (regmean's grams) may lack a tensor: None stands for it."""

    def __init__(self, config_dir: Path, names: frozenset = frozenset({"mask"}),
                 optional: frozenset = frozenset()):
        self.dir, self.open, self.names, self.optional = config_dir, {}, names, optional

    def get(self, path: str, name: str, param: str = "mask") -> np.ndarray | None:
        if path not in self.open:
            where = Path(locate(path, self.dir))
            if where.is_dir():
                where = where / f"{param}.safetensors"
                if not where.is_file():
                    raise JmergeError(f"{param} path {path} is a directory without {param}.safetensors")
            self.open[path] = Checkpoint(where)
        ck = self.open[path]
        if name not in ck.where:
            if param in self.optional:
                return None
            raise JmergeError(f"{param} file {path} has no tensor {name}")
        return np.asarray(ck.array(name), np.float32)


@dataclasses.dataclass
class Prepared:
    """A checked plan made ready to merge: the output's config and dtypes, vocabulary and chat
    template, and every output tensor's job with its host-computed parameters."""
    checked: Checked
    out_cfg: ModelConfig
    out_dtype: np.dtype
    compute_dtype: np.dtype | None
    tokenizer: TokenizerPlan | None
    chat_template: str | None
    jobs: dict[str, TensorJob]
    masks: MaskFiles
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


def prepare(c: Checked, *, allow_nonfinite: bool = False) -> Prepared:
    plan = c.plan
    tp = plan_tokenizer(c)
    ref = c.models[c.ref_model]
    out_dtype = (np_dtype(plan.out_dtype) if plan.out_dtype
                 else np.dtype(ref.source.dtype("model.embed_tokens.weight")))
    out_cfg = out_config(plan, c.models, c.ref_model, c.resolved, tp.rows if tp else None, out_dtype.name)
    layout = hf.hf_layout(out_cfg)
    jobs = {j.out_name: with_host_params(plan.method, j, layout.get(j.out_name)) for j in c.resolved.jobs}
    return Prepared(c, out_cfg, out_dtype, np_dtype(plan.dtype) if plan.dtype else None, tp,
                    resolve_chat_template(c), jobs,
                    MaskFiles(Path(plan.path).resolve().parent,
                              frozenset(k for k, prm in plan.method.params.items() if prm.path),
                              frozenset(k for k, prm in plan.method.params.items() if prm.optional)),
                    allow_nonfinite=allow_nonfinite)


def np_dtype(name: str) -> np.dtype:
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
    if src.reads_into:
        buf = aligned_empty(src.shape(name), src.dtype(name))
        src.read_into(name, (slice(None),), buf)
    else:
        buf = np.asarray(src.array(name))
    if dtype is None or buf.dtype == dtype:
        return buf
    out = aligned_empty(buf.shape, dtype)
    out[...] = buf
    return out


def embedding_inputs(p: Prepared, job: TensorJob) -> dict[str, np.ndarray]:
    """The (vocabulary-aligned) embedding / lm_head rows of every model feeding `job`."""
    c = p.checked
    refs = list(dict.fromkeys(job.inputs))
    base = c.plan.slices[job.slice].base_model or c.plan.base_model
    extra = [base] if base and base not in refs and base in c.models else []
    arrays = {r: read_tensor(c.models[r], embed_name(c.models[r], job.out_name), p.compute_dtype)
              for r in refs + extra}
    out = permute_embeddings(arrays, p.tokenizer, base)
    return {r: out[r] for r in refs}


def embed_name(m: ModelInput, name: str) -> str:
    # a tied model has no lm_head: its embedding is the head
    if name == "lm_head.weight" and m.cfg.tie_word_embeddings:
        return "model.embed_tokens.weight"
    return name


def job_inputs(p: Prepared, job: TensorJob) -> list[np.ndarray]:
    """The arrays of `job.inputs`, read from the files."""
    if realigned(p, job):
        arrays = embedding_inputs(p, job)
        return [arrays[r] for r in job.inputs]
    return [read_tensor(p.checked.models[r], n, p.compute_dtype) for r, n in zip(job.inputs, job.in_names)]


def realigned(p: Prepared, job: TensorJob) -> bool:
    """Whether the job's inputs are embedding rows rearranged into the output vocabulary."""
    return p.tokenizer is not None and p.tokenizer.changed and job.out_name in EMBED_NAMES
