"""MODEL − BASE as a PEFT LoRA adapter: a truncated SVD of each linear weight's delta.

For ΔW = U S Vᵀ, rank r: B = U_r·S_r^½ [out, r], A = S_r^½·V_rᵀ [r, in] (S split evenly so
neither factor dwarfs the other), lora_alpha = r so PEFT's ΔW = B·A·(alpha/r) is B·A exactly.
Only the decoder layers' linear weights are extracted: embeddings, lm_head and norms are not
(a LoRA adapter of them is not what PEFT's LoraConfig target_modules means for a Llama).
"""

from __future__ import annotations

import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jmerge.errors import JmergeError

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
REPORT = "extract_report.json"


def _factor_one(m, b, rank: int):
    d = m.astype(jnp.float32) - b.astype(jnp.float32)
    finite = jnp.all(jnp.isfinite(d))
    d = jnp.where(finite, d, 0.0)  # keep the SVD well defined; the flag reports the tensor
    u, s, vt = jnp.linalg.svd(d, full_matrices=False)
    root = jnp.sqrt(s[:rank])
    bb, aa = u[:, :rank] * root, root[:, None] * vt[:rank]
    norm = jnp.linalg.norm(d)
    err = jnp.where(norm > 0, jnp.linalg.norm(d - bb @ aa) / jnp.where(norm > 0, norm, 1.0), 0.0)
    return bb, aa, err, finite


@functools.partial(jax.jit, static_argnames=("rank", "mesh"))
def factor(model_w, base_w, rank: int, mesh=None):
    """Stacked [L, out, in] weights -> (B [L, out, r], A [L, r, in], relative error [L], finite [L]).
    One program per (shape, rank); the SVD is vmapped over layers, in float32. With a `mesh` whose
    size divides L the layers are dealt out over all its devices (shard_map: each device runs
    the SVDs of its own layers; an SVD itself does not partition)."""
    run = jax.vmap(functools.partial(_factor_one, rank=rank))
    if mesh is None or mesh.size == 1 or model_w.shape[0] % mesh.size:
        return run(model_w, base_w)
    spec = P(mesh.axis_names)
    return jax.shard_map(run, mesh=mesh, in_specs=(spec, spec), out_specs=(spec, spec, spec, spec))(
        model_w, base_w)


def _leaf(params, module: str):
    node = params["model"]["layers"]
    for k in module.split("."):
        node = node[k]
    return node["weight"]


def _modules(layout: dict, chosen) -> list[str]:
    have = [m for m in LINEARS if f"model.layers.0.{m}.weight" in layout]
    if not chosen:
        return have
    by_short = {m.split(".")[-1]: m for m in have}
    out, bad = [], []
    for c in chosen:
        m = c if c in have else by_short.get(c)
        if m is None:
            bad.append(c)
        elif m not in out:
            out.append(m)
    if bad:
        raise JmergeError(f"--modules: unknown linear module(s) {', '.join(bad)}; "
                          f"choose from {', '.join(by_short)}")
    return out


def _same_architecture(m, b, model: str, base: str) -> dict:
    """The HF layout (name -> shape) both configs imply; it must be the same."""
    from jmerge.io import hf
    lm, lb = hf.hf_layout(m.cfg), hf.hf_layout(b.cfg)
    if m.cfg.family == b.cfg.family and lm == lb:
        return lm
    diff = [n for n in lm if lb.get(n) != lm[n]] + [n for n in lb if n not in lm]
    what = f"first difference {diff[0]}: {lm.get(diff[0])} vs {lb.get(diff[0])}" if diff else "families differ"
    raise JmergeError(f"{model} and {base} have different architectures ({m.cfg.family} vs "
                      f"{b.cfg.family}; {what})")


def extract_lora(model, base, out, *, rank: int, modules=None, mesh=None, force=False,
                 progress=True) -> str:
    """Write the adapter directory `out` (adapter_config.json, adapter_model.safetensors,
    extract_report.json) and return the one-line summary."""
    from jmerge import distributed, sharding
    from jmerge.io import load_model
    from jmerge.io.atomic import atomic_dir, check_target, model_inputs
    from jmerge.io.safetensors_io import write_file
    from jmerge.io.source import open_source
    from jmerge.progress import bar as progress_bar

    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise JmergeError(f"--rank must be a positive integer, got {rank!r}")
    inputs = model_inputs(model) + model_inputs(base)
    check_target(out, force, inputs=inputs)  # fail before any heavy work
    t0 = time.perf_counter()
    # Configs and headers first: architecture, modules and rank are checked before any weight is read.
    layout = _same_architecture(open_source(model), open_source(base), str(model), str(base))
    mods = _modules(layout, modules)
    for mod in mods:
        o, i = layout[f"model.layers.0.{mod}.weight"]
        if rank > min(o, i):
            raise JmergeError(f"--rank {rank} exceeds the rank bound min(out, in) = {min(o, i)} of "
                              f"{mod} [{o}, {i}]")
    mesh = sharding.make_mesh(mesh)
    # Non-finite weights are found per delta below, so the error names the tensor extracted.
    m = load_model(model, mesh=mesh, dtype=jnp.float32, allow_nonfinite=True, progress=progress)
    b = load_model(base, mesh=mesh, dtype=jnp.float32, allow_nonfinite=True, progress=progress)
    tensors: dict[str, np.ndarray] = {}
    errors: dict[str, float] = {}
    bar = progress_bar(len(mods), progress, "extract")
    for mod in mods:
        bb, aa, err, finite = factor(_leaf(m.params, mod), _leaf(b.params, mod), rank=rank, mesh=mesh)
        finite = sharding.host_value(finite)
        if not finite.all():
            layer = int(np.argmin(finite))
            raise JmergeError(f"model.layers.{layer}.{mod}.weight: the delta {model} - {base} has NaN/Inf values")
        bb, aa, err = (sharding.host_value(x) for x in (bb, aa, err))
        for layer in range(bb.shape[0]):
            pre = f"base_model.model.model.layers.{layer}.{mod}"
            tensors[f"{pre}.lora_A.weight"] = aa[layer]
            tensors[f"{pre}.lora_B.weight"] = bb[layer]
            errors[f"model.layers.{layer}.{mod}"] = float(err[layer])
        bar.update(1)
    bar.close()
    report = dict(model=str(model), base=str(base), rank=rank, lora_alpha=rank,
                  modules=[x.split(".")[-1] for x in mods], max_relative_error=max(errors.values()),
                  mean_relative_error=float(np.mean(list(errors.values()))), relative_error=errors)
    config = dict(peft_type="LORA", task_type="CAUSAL_LM", base_model_name_or_path=str(b.source),
                  r=rank, lora_alpha=rank, lora_dropout=0.0, bias="none", fan_in_fan_out=False,
                  use_rslora=False, use_dora=False, inference_mode=True,
                  target_modules=report["modules"])
    with atomic_dir(out, force, inputs=inputs) as tmp:
        if distributed.is_lead():
            items = [(n, np.dtype(np.float32), t.shape) for n, t in tensors.items()]
            write_file(tmp / "adapter_model.safetensors", items, (t.astype(np.float32) for t in tensors.values()))
            (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
            (tmp / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    worst = max(errors, key=errors.get)
    return (f"extracted {model} - {base} -> {out}: rank {rank}, {len(mods)} modules x {m.cfg.num_layers} "
            f"layers, relative error max {errors[worst]:.3g} ({worst}), mean {report['mean_relative_error']:.3g}, "
            f"{time.perf_counter() - t0:.1f} s")
