"""Per-model statistics from data, for the data-driven merge methods: `fisher` (Fisher averaging),
`led` (SNIP scores) and `regmean` (Gram matrices of the linears' inputs).

Over prompt/response pairs (chat template applied, the loss on the response only, as in
`jmerge.train`), in batches padded to one shape so every per-batch program compiles once:

- fisher: the diagonal empirical Fisher F = mean_b (∂L_b/∂θ)², L_b the token-mean response CE of
  batch b. A batch-gradient approximation of the per-example empirical Fisher (the two agree
  with --batch-size 1, which is per-example).
- snip: |θ ⊙ ∂L/∂θ|, L the token-mean response CE over all the batches used (the gradients of the
  batches accumulated, as gradient accumulation does), what `led` reads as scores / base_scores.
- gram: Σ x xᵀ [in, in] over every non-padding token (prompt and response) of each decoder
  linear's input x; norms, embeddings and lm_head have none (regmean averages them).

Files are keyed by HF tensor name, float32: fisher.safetensors, scores.safetensors,
grams.safetensors, plus stats.json, in one directory written whole or not at all.
"""

from __future__ import annotations

import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jmerge.errors import JmergeError
from jmerge.models import llama
from jmerge.objectives import response_ce

KINDS = {"fisher": "fisher.safetensors", "snip": "scores.safetensors", "gram": "grams.safetensors"}
# Each decoder linear and the input it shares: q/k/v read the same normed hidden states, gate/up
# too, so one Gram serves each group (written under every member's name).
LINEARS = {"self_attn.q_proj": "attn", "self_attn.k_proj": "attn", "self_attn.v_proj": "attn",
           "self_attn.o_proj": "o", "mlp.gate_proj": "mlp", "mlp.up_proj": "mlp", "mlp.down_proj": "down"}
# The families jmerge.models.llama runs: the Gram capture reuses its decoder layer.
GRAM_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
REPORT = "stats.json"


def parse_kinds(spec) -> tuple[str, ...]:
    kinds = [k.strip() for k in (spec.split(",") if isinstance(spec, str) else spec) if k.strip()]
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise JmergeError(f"--kind: unknown kind(s) {', '.join(bad) or repr(spec)}; choose from {', '.join(KINDS)}")
    return tuple(k for k in KINDS if k in kinds)


class _Tap(nnx.Module):
    """A linear that leaves its input in `seen[key]` (the first one seen) before it runs."""

    def __init__(self, inner, key, seen):
        self.inner, self.key, self.seen = inner, key, seen

    def __call__(self, x):
        self.seen.setdefault(self.key, x)
        return self.inner(x)


def linear_grams(params, cfg, input_ids, attention_mask) -> dict:
    """{input group: Σ x xᵀ [L, in, in] float32} over the tokens where attention_mask is 1. The
    model's own decoder layer runs each scan step, with its linears wrapped to hand out their
    inputs; what precedes the layers is the no-cache prelude of `LlamaForCausalLM.__call__`."""
    mask = attention_mask.astype(jnp.int32)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    model = llama.bind(cfg, params)
    x = model.model.embed_tokens(input_ids)
    inv_freq = jnp.asarray(cfg.inv_freq(), jnp.float32)
    windows = jnp.asarray(cfg.layer_windows or (0,) * cfg.num_layers, jnp.int32)
    layer_def, layer_state = nnx.split(model.model.layers)
    keep = mask[..., None].astype(jnp.float32)

    def body(h, xs):
        lx, window = xs
        layer = nnx.merge(layer_def, lx)
        seen = {}
        for path, group in LINEARS.items():
            block, name = path.split(".")
            parent = getattr(layer, block)
            setattr(parent, name, _Tap(getattr(parent, name), group, seen))
        h, _ = layer(h, positions, inv_freq, window, None, mask, 0)
        grams = {g: jnp.einsum("bti,btj->ij", v.astype(jnp.float32) * keep, v.astype(jnp.float32),
                               precision=jax.lax.Precision.HIGHEST) for g, v in seen.items()}
        return h, grams

    return jax.lax.scan(body, x, (nnx.to_pure_dict(layer_state), windows))[1]


def _step(acc, params, batch, *, cfg, kinds):
    """One batch added to the running sums (see `compute`)."""
    acc = dict(acc)
    if "fisher" in kinds or "snip" in kinds:
        (_, n), g = jax.value_and_grad(lambda p: response_ce(p, cfg, batch, remat=True), has_aux=True)(params)
        g = jax.tree.map(lambda x: x.astype(jnp.float32), g)
        nf = jnp.maximum(n, 1).astype(jnp.float32)
        if "fisher" in kinds:
            acc["fisher"] = jax.tree.map(lambda a, x: a + jnp.square(x / nf), acc["fisher"], g)
        if "snip" in kinds:
            acc["snip"] = jax.tree.map(jnp.add, acc["snip"], g)
        acc["targets"] = acc["targets"] + n
    if "gram" in kinds:
        grams = linear_grams(params, cfg, batch["input_ids"], batch["attention_mask"])
        acc["gram"] = jax.tree.map(jnp.add, acc["gram"], grams)
    acc["tokens"] = acc["tokens"] + jnp.sum(batch["attention_mask"])
    return acc


@functools.partial(jax.jit, static_argnames=("kinds",))
def _finish(acc, params, batches, *, kinds):
    out = {}
    if "fisher" in kinds:
        out["fisher"] = jax.tree.map(lambda a: a / batches, acc["fisher"])
    if "snip" in kinds:
        n = jnp.maximum(acc["targets"], 1).astype(jnp.float32)
        out["snip"] = jax.tree.map(lambda a, p: jnp.abs(p.astype(jnp.float32) * (a / n)), acc["snip"], params)
    if "gram" in kinds:
        out["gram"] = acc["gram"]
    return out


def _zeros(params, cfg, kinds, mesh) -> dict:
    """The running sums, zero. Each has a fixed place on the mesh (the step's outputs are pinned
    there), so every batch runs the first batch's program: params-shaped sums as the params, the
    Grams split over fsdp by column (the largest, [L, in, in] each, are never whole on a device)."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from jmerge.sharding import replicated
    one = replicated(mesh)
    acc = {"tokens": jnp.zeros((), jnp.int32, device=one), "targets": jnp.zeros((), jnp.int32, device=one)}
    for k in ("fisher", "snip"):
        if k in kinds:
            acc[k] = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32, device=p.sharding), params)
    if "gram" in kinds:
        dims = {"attn": cfg.hidden_size, "o": cfg.num_heads * cfg.head_dim, "mlp": cfg.hidden_size,
                "down": cfg.intermediate_size}
        split = {g: P(None, None, "fsdp") if d % mesh.shape["fsdp"] == 0 else P() for g, d in dims.items()}
        acc["gram"] = {g: jnp.zeros((cfg.num_layers, d, d), jnp.float32, device=NamedSharding(mesh, split[g]))
                       for g, d in dims.items()}
    return acc


def _chunks(examples, batch_size: int, limit: int | None, rows: int, pad_id: int):
    """The data file's order in batches of `batch_size` examples (the first `limit`), each
    collated to one [rows, length] shape: rows a multiple of the mesh's batch split (extra rows
    are padding), length the bucket of the longest example used."""
    from jmerge import data
    groups = [examples[i:i + batch_size] for i in range(0, len(examples), batch_size)][:limit]
    length = data.bucket(max(len(e.ids) for g in groups for e in g))
    return [data.collate(g, length, rows, pad_id) for g in groups], sum(map(len, groups))


def _place(batch: dict, mesh) -> dict:
    from jmerge import sharding as shd

    def put(x):
        return jax.make_array_from_callback(x.shape, shd.batch_sharding(mesh, x.ndim), lambda idx: x[idx])
    return {k: put(v) for k, v in batch.items()}


def _files(out: dict, cfg) -> dict[str, tuple[list, object]]:
    """{file name: (header items, host arrays one at a time)}, named as the merge engine looks
    them up: params-shaped results by HF tensor name, the Grams under each linear's weight name."""
    from jmerge.io import hf
    from jmerge.sharding import host_value
    f32 = np.dtype(np.float32)
    files = {}
    layout = hf.hf_layout(cfg)
    for kind in ("fisher", "snip"):
        if kind in out:
            files[KINDS[kind]] = ([(n, f32, s) for n, s in layout.items()],
                                  (a for _, a in hf.iter_hf_tensors(out[kind], cfg, np.float32)))
    if "gram" in out:
        grams = [(f"model.layers.{i}.{path}.weight", g, i) for i in range(cfg.num_layers) for path, g in LINEARS.items()]
        files[KINDS["gram"]] = ([(n, f32, tuple(out["gram"][g].shape[1:])) for n, g, _ in grams],
                                (host_value(out["gram"][g][i]) for _, g, i in grams))
    return files


def compute(model, data_path, out, *, kinds=("fisher",), batch_size: int = 4, max_len: int = 512,
            batches: int | None = None, dtype: str = "float32", mesh=None, force: bool = False,
            progress: bool = True) -> str:
    """Write the statistics directory `out` (see the module docstring) and return a summary line."""
    from tqdm.auto import tqdm

    from jmerge import data, distributed, sharding
    from jmerge.generate import load_tokenizer
    from jmerge.io import load_model, split_adapter
    from jmerge.io.atomic import atomic_dir, check_target, model_inputs
    from jmerge.io.safetensors_io import write_file
    from jmerge.io.source import open_source

    kinds = parse_kinds(kinds)
    for name, v in (("--batch-size", batch_size), ("--max-len", max_len), ("--batches", batches)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
            raise JmergeError(f"{name} must be a positive integer, got {v!r}")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise JmergeError(f"--dtype: expected float32, bfloat16 or float16, got {dtype!r}")
    inputs = model_inputs(model) + [data_path]
    check_target(out, force, inputs=inputs)  # before any heavy work
    t0 = time.perf_counter()
    distributed.check_same_files([data_path])
    rows = data.read_pairs(data_path)
    src = open_source(model)
    cfg = src.cfg
    if "gram" in kinds and cfg.family not in GRAM_FAMILIES:
        raise JmergeError(f"{model}: Gram statistics are computed for the {', '.join(GRAM_FAMILIES)} "
                          f"families only, not {cfg.family}")
    tok = load_tokenizer(split_adapter(str(model))[0], src.write_tokenizer)
    examples = data.encode_pairs(tok, rows, max_len)
    mesh = sharding.make_mesh(mesh)
    split = mesh.shape["data"] * mesh.shape["fsdp"]
    rows_per = -(-batch_size // split) * split
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    todo, used = _chunks(examples, batch_size, batches, rows_per, pad_id)

    m = load_model(model, mesh=mesh, dtype=jnp.dtype(dtype), progress=progress)
    acc = _zeros(m.params, cfg, kinds, mesh)
    step = jax.jit(functools.partial(_step, cfg=cfg, kinds=kinds), donate_argnums=(0,),
                   out_shardings=jax.tree.map(lambda x: x.sharding, acc))
    bar = tqdm(total=len(todo), desc="stats", unit="batch", disable=not progress, leave=False)
    for b in todo:
        acc = step(acc, m.params, _place(b, mesh))
        bar.update(1)
    bar.close()
    tokens, targets = (int(sharding.host_value(acc[k])) for k in ("tokens", "targets"))
    files = _files(_finish(acc, m.params, len(todo), kinds=kinds), cfg)
    report = dict(model=str(model), data=str(data_path), kinds=list(kinds), files=list(files),
                  batches=len(todo), batch_size=batch_size, examples=used, max_len=max_len,
                  length=int(todo[0]["input_ids"].shape[1]), dtype=dtype, tokens=tokens,
                  response_tokens=targets if {"fisher", "snip"} & set(kinds) else None)
    with atomic_dir(out, force, inputs=inputs) as tmp:
        for fname, (heads, arrays) in files.items():
            if distributed.is_lead():
                write_file(tmp / fname, heads, arrays, {"format": "pt", "jmerge": "stats"})
            else:  # every process joins each gather; process 0 writes
                for _ in arrays:
                    pass
        if distributed.is_lead():
            (tmp / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    return (f"stats of {model} on {data_path} -> {out}: {', '.join(kinds)} over {len(todo)} batches "
            f"({tokens} tokens), {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    from jmerge.cli import module_main
    module_main("stats")
