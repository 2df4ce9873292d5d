"""The models a plan reads, opened and checked before any merge: from configs, safetensors
headers and tokenizer files only (architectures, layer counts and ranges, tensor shapes, vocab
sizes and tokenizers, dtypes), every problem of a stage listed at once; `scan_values` then reads
every weight once for NaN/Inf (a merge skips that pass and checks each tensor as it reads it)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable

import numpy as np

from jmerge.config import ModelConfig, from_hf_dict
from jmerge.engine.config import load_plan
from jmerge.engine.jobs import Resolved, resolve
from jmerge.engine.plan import MergePlan
from jmerge.errors import JmergeError, collect, first_line
from jmerge.io.files import read_bytes, read_text
from jmerge.io.source import Use, locate, open_source

SHAPE_FIELDS = ("family", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads",
                "head_dim", "tie_word_embeddings", "qkv_bias", "o_bias", "mlp_bias", "qk_norm")
FLOAT_KINDS = ("float32", "float16", "bfloat16")


@dataclasses.dataclass
class ModelInput:
    ref: str
    path: Path  # the model directory or file (the base when ref is BASE+ADAPTER)
    cfg: ModelConfig
    source: object  # a TensorSource (hf.TensorSource protocol)
    write_tokenizer: Callable[[Path], None]
    tokenizer_dir: Path | None

    def vocab(self) -> dict[str, int] | None:
        return read_vocab(self.tokenizer_dir) if self.tokenizer_dir else None

    def nbytes(self) -> int:
        return sum(int(np.prod(self.source.shape(n), dtype=np.int64)) * np.dtype(self.source.dtype(n)).itemsize
                   for n in self.source.names())


@dataclasses.dataclass
class Checked:
    plan: MergePlan
    models: dict[str, ModelInput]
    resolved: Resolved
    ref_model: str  # whose config and (by default) tokenizer the output takes
    out_cfg: ModelConfig
    warnings: list[str]


def read_vocab(d: Path) -> dict[str, int] | None:
    f = d / "tokenizer.json"
    try:
        if f.exists():
            from tokenizers import Tokenizer
            return Tokenizer.from_str(read_text(f, "tokenizer.json")).get_vocab(with_added_tokens=True)
        if any((d / n).exists() for n in ("tokenizer.model", "vocab.json")):
            from transformers import AutoTokenizer
            return AutoTokenizer.from_pretrained(str(d)).get_vocab()
    except JmergeError:
        raise
    except Exception as e:  # tokenizers / transformers / sentencepiece errors share no base class
        first = first_line(e)
        raise JmergeError(f"{d}: cannot read the tokenizer ({first})") from None
    return None


def _tokenizer_digest(d: Path | None) -> str | None:
    """Identical tokenizer.json bytes need no vocabulary comparison."""
    if d is None or not (d / "tokenizer.json").exists():
        return None
    import hashlib
    return hashlib.sha256(read_bytes(d / "tokenizer.json", "tokenizer.json")).hexdigest()


def open_model(ref: str, config_dir: Path) -> ModelInput:
    s = open_source(ref, config_dir=config_dir, use=Use.MERGE)
    return ModelInput(ref, s.path, s.cfg, s.tensors, s.write_tokenizer, s.tokenizer_dir)


def _layer_split(cfg: ModelConfig):
    from jmerge.io import hf
    names = list(hf.hf_layout(cfg))
    layer = [n[len("model.layers.0."):] for n in names if n.startswith("model.layers.0.")]
    first = next(i for i, n in enumerate(names) if n.startswith("model.layers."))
    pre = [n for n in names[:first] if not n.startswith("model.layers.")]
    post = [n for n in names[first:] if not n.startswith("model.layers.")]
    return layer, pre, post


def out_config(plan: MergePlan, models: dict[str, ModelInput], ref: str, res: Resolved,
               vocab_size: int | None, out_dtype: str | None) -> ModelConfig:
    conf = dict(models[ref].cfg.hf_config)
    conf["num_hidden_layers"] = res.num_layers
    if vocab_size is not None:
        conf["vocab_size"] = vocab_size
    if conf.get("layer_types"):
        types = []
        for si, s in enumerate(plan.slices):
            src = s.sources[0]
            a = src.layer_range[0] if src.layer_range else 0
            lo, hi = res.slice_layers[si]
            src_types = models[src.model].cfg.hf_config.get("layer_types") or ["full_attention"] * 10**6
            types += [src_types[a + i] for i in range(hi - lo)]
        conf["layer_types"] = types
    if out_dtype:
        conf["torch_dtype" if "torch_dtype" in conf else "dtype"] = out_dtype
    return from_hf_dict(conf, f"{plan.path}: the merged model's config (from {ref})")


def check_plan(plan: MergePlan, *, scan_values: bool = False, progress: bool = False,
               opener: Callable[[str, Path], ModelInput] | None = None) -> Checked:
    """Open every model (headers only; `opener(ref, config_dir)`, default `open_model`) and check
    them against each other and the plan."""
    from jmerge.io import hf

    config_dir = Path(plan.path).resolve().parent
    problems: list[str] = []
    warnings: list[str] = []
    models: dict[str, ModelInput] = {}
    for ref in plan.referenced():
        try:
            models[ref] = (opener or open_model)(ref, config_dir)
            if models[ref].tokenizer_dir is not None and models[ref].tokenizer_dir.is_dir():
                hf.check_tokenizer(models[ref].tokenizer_dir)  # the merge copies these files
        except JmergeError as e:
            problems.append(str(e))
    collect(problems, f"{plan.path}: cannot open models")

    ref_model = plan.base_model or plan.referenced()[0]
    rc = models[ref_model].cfg
    for ref, m in models.items():
        for f in SHAPE_FIELDS:
            a, b = getattr(m.cfg, f), getattr(rc, f)
            if a != b:
                problems.append(f"{ref}: {f} {a} differs from {ref_model}'s {b}")
        try:
            hf.validate(m.source, m.cfg, ref)
        except JmergeError as e:
            problems.append(str(e))
        kinds = {np.dtype(m.source.dtype(n)).name for n in m.source.names()}
        bad = sorted(kinds - set(FLOAT_KINDS))
        if bad:
            problems.append(f"{ref}: tensors of dtype {', '.join(bad)} cannot be merged (floats only)")
        if len(kinds) > 1:
            warnings.append(f"{ref}: mixed dtypes {sorted(kinds)}")
    collect(problems, f"{plan.path}: models do not fit together")

    # vocab sizes and tokenizers
    rows = {ref: m.cfg.vocab_size for ref, m in models.items()}
    if plan.tokenizer_source is None:
        if len(set(rows.values())) > 1:
            sizes = ", ".join(f"{r}: {v}" for r, v in rows.items())
            problems.append(f"vocab sizes differ ({sizes}); set tokenizer_source: base, union or a model")
        elif len({_tokenizer_digest(m.tokenizer_dir) for m in models.values()}) > 1:
            vocabs = {ref: m.vocab() for ref, m in models.items()}
            known = {r: v for r, v in vocabs.items() if v is not None}
            if len({json.dumps(sorted(v.items())) for v in known.values()}) > 1:
                warnings.append("tokenizers differ between models with equal vocab sizes; the output "
                                f"takes {ref_model}'s (set tokenizer_source to choose)")
    else:
        for ref, m in models.items():
            if m.tokenizer_dir is None or m.vocab() is None:
                problems.append(f"{ref}: no tokenizer files, needed for tokenizer_source {plan.tokenizer_source!r}")

    layer, pre, post = _layer_split(rc)
    try:
        res = resolve(plan, {r: m.cfg.num_layers for r, m in models.items()}, layer, pre, post)
    except JmergeError as e:
        problems.append(str(e).removeprefix(f"{plan.path}: "))
        res = None
    collect(problems, f"{plan.path}")

    out_cfg = out_config(plan, models, ref_model, res, None, plan.out_dtype)
    if scan_values:
        scan_finite(models, progress=progress)
    return Checked(plan, models, res, ref_model, out_cfg, warnings)


def scan_finite(models: dict[str, ModelInput], progress: bool = False) -> None:
    """Read every weight once; list all tensors holding NaN/Inf."""
    bad = []
    for ref, m in models.items():
        for n in m.source.names():
            a = np.asarray(m.source.array(n))
            if not np.isfinite(a.astype(np.float32, copy=False)).all():
                bad.append(f"{ref}: {n}")
    collect([f"{b} has NaN/Inf values" for b in bad], "non-finite weights")


def check(config: str | Path, *, scan_values: bool = True, lenient: bool = False) -> Checked:
    return check_plan(load_plan(config, lenient=lenient), scan_values=scan_values)


def plan_inputs(plan: MergePlan) -> list[str]:
    """Every path a merge reads: the config and its models (located as check_plan locates them)."""
    config_dir = Path(plan.path).resolve().parent
    return [plan.path, *(locate(ref, config_dir) for ref in plan.referenced())]
