"""Differential tests: `jmerge merge` against mergekit 0.1.5 itself, same YAML, same inputs.

mergekit runs in its own virtualenv (tests/mergekit_ref.py; created on first use, reused after),
all configs in one process. Every deterministic method mergekit and jmerge share is merged on
tiny float32 Llamas with per-model weights, densities, gradients (lists interpolated over the
layers) and `{filter, value}` lists; the outputs must agree tensor by tensor within float32
rounding. The random methods (dare_*, della*) draw from different generators and are not here.

The inputs have no ties where mergekit breaks them arbitrarily (torch's argsort and topk): each
base weight lies on a 2**-10 grid and each task vector entry is a distinct multiple of 2**-22
below 2**-4, so model - base is exact in float32 and its magnitudes are all different.

The model is 20 wide, so its norm weights have n = 20 entries: density 0.33 keeps
int(6.6) = 6 of them in mergekit (round half up would keep 7) and density 0.02 keeps
max(1, int(0.4)) = 1 (rounding would keep 0).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import tiny_hf_config
from mergekit_ref import run_mergekit_many

N_LAYERS = 3
WIDTH = 20
GRID = 2.0 ** -10
STEP = 2.0 ** -22

# {v1}, {v2}, {v3} are fine-tunes of {base}; every list of numbers is a gradient over 3 layers.
CASES = {
    "linear": """
models:
  - {{model: {base}, parameters: {{weight: [0.2, 0.7]}}}}
  - {{model: {v1}, parameters: {{weight: [{{filter: mlp, value: 0.5}}, {{value: 0.3}}]}}}}
  - {{model: {v2}, parameters: {{weight: 0.4}}}}
merge_method: linear
""",
    "task_arithmetic": """
models:
  - {{model: {v1}, parameters: {{weight: 0.6}}}}
  - {{model: {v2}, parameters: {{weight: [0.2, 0.9]}}}}
  - {{model: {v3}, parameters: {{weight: [{{filter: self_attn, value: -0.3}}, {{value: 0.5}}]}}}}
merge_method: task_arithmetic
base_model: {base}
parameters: {{lambda: 0.8}}
""",
    "ties": """
models:
  - {{model: {v1}, parameters: {{weight: 0.6, density: [1, 0.5, 0.33]}}}}
  - {{model: {v2}, parameters: {{weight: [{{filter: mlp, value: 0.3}}, {{value: 0.9}}], density: 0.33}}}}
  - {{model: {v3}, parameters: {{weight: [0.2, 0.7], density: [{{filter: layernorm, value: 0.02}}, {{value: 0.6}}]}}}}
merge_method: ties
base_model: {base}
""",
    "ties_unnormalized_rescaled": """
models:
  - {{model: {v1}, parameters: {{weight: 0.7, density: 0.33}}}}
  - {{model: {v2}, parameters: {{weight: 0.5, density: [0.02, 0.33]}}}}
merge_method: ties
base_model: {base}
parameters: {{normalize: false, rescale: true, lambda: 1.3}}
""",
    # one model, normalized: its kept entries are exactly base + tau, so the count is visible
    "ties_counts": """
models:
  - {{model: {v1}, parameters: {{weight: 0.5, density: [{{filter: input_layernorm, value: 0.33}}, {{filter: post_attention, value: 0.02}}, {{value: 0.5}}]}}}}
merge_method: ties
base_model: {base}
""",
    "breadcrumbs": """
models:
  - {{model: {v1}, parameters: {{weight: 0.6, density: 0.33, gamma: 0.08}}}}
  - {{model: {v2}, parameters: {{weight: [0.4, 1.0], density: [0.5, 0.33], gamma: [{{filter: mlp, value: 0.02}}, {{value: 0.1}}]}}}}
merge_method: breadcrumbs
base_model: {base}
""",
    "breadcrumbs_ties": """
models:
  - {{model: {v1}, parameters: {{weight: 0.6, density: 0.33, gamma: 0.08}}}}
  - {{model: {v2}, parameters: {{weight: 0.8, density: [0.7, 0.4], gamma: 0.3}}}}
merge_method: breadcrumbs_ties
base_model: {base}
parameters: {{normalize: true}}
""",
    "sce": """
models: [{{model: {v1}}}, {{model: {v2}}}, {{model: {v3}}}]
merge_method: sce
base_model: {base}
parameters: {{select_topk: [0.33, 0.6]}}
""",
    "slerp": """
models: [{{model: {base}}}, {{model: {v1}}}]
merge_method: slerp
base_model: {base}
parameters:
  t: [{{filter: self_attn, value: [0, 0.5, 1]}}, {{filter: mlp, value: [1, 0.3]}}, {{value: 0.4}}]
""",
    "nuslerp": """
models:
  - {{model: {v1}, parameters: {{weight: [0.3, 0.8]}}}}
  - {{model: {v2}, parameters: {{weight: 0.7}}}}
merge_method: nuslerp
""",
    "nuslerp_base_rows": """
models:
  - {{model: {v1}, parameters: {{weight: 0.3}}}}
  - {{model: {v2}, parameters: {{weight: [{{filter: mlp, value: 0.9}}, {{value: 0.6}}]}}}}
merge_method: nuslerp
base_model: {base}
parameters: {{nuslerp_flatten: false, nuslerp_row_wise: true}}
""",
    "multislerp": """
models:
  - {{model: {v1}, parameters: {{weight: [0.3, 0.6]}}}}
  - {{model: {v2}, parameters: {{weight: 0.7}}}}
  - {{model: {v3}, parameters: {{weight: 0.2}}}}
merge_method: multislerp
base_model: {base}
""",
    "karcher": """
models: [{{model: {v1}}}, {{model: {v2}}}, {{model: {base}}}]
merge_method: karcher
parameters: {{max_iter: 20}}
""",
    "model_stock": """
models: [{{model: {v1}}}, {{model: {v2}}}, {{model: {v3}}}]
merge_method: model_stock
base_model: {base}
""",
    "nearswap": """
models: [{{model: {v1}}}]
merge_method: nearswap
base_model: {base}
parameters: {{t: [0.01, 0.04]}}
""",
    "arcee_fusion": """
models: [{{model: {v1}}}]
merge_method: arcee_fusion
base_model: {base}
""",
    "ram": """
models: [{{model: {v1}}}, {{model: {v2}}}, {{model: {v3}}}]
merge_method: ram
base_model: {base}
parameters: {{epsilon: 0.01}}
""",
    "ramplus_tl": """
models: [{{model: {v1}}}, {{model: {v2}}}]
merge_method: ramplus_tl
base_model: {base}
parameters: {{epsilon: 0.01, r: 0.3, alpha: 0.5}}
""",
    "passthrough": """
slices:
  - sources: [{{model: {base}, layer_range: [0, 2]}}]
  - sources: [{{model: {v1}, layer_range: [1, 3], parameters: {{scale: [{{filter: o_proj, value: 0.5}}, {{value: 1.0}}]}}}}]
merge_method: passthrough
""",
}

# The methods that carry host-computed counts: their layered groups are checked in memory too.
BOTH_MODES = ("ties", "ties_counts", "breadcrumbs")


def _write_models(root):
    """base, v1, v2, v3: tiny float32 Llamas (transformers' own layout and config), weights as
    described in the module docstring."""
    import torch
    from transformers import AutoModelForCausalLM
    cfg = tiny_hf_config("llama", hidden_size=WIDTH, intermediate_size=WIDTH, num_hidden_layers=N_LAYERS,
                         num_attention_heads=2, num_key_value_heads=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    rng = np.random.default_rng(0)
    names = [n for n, _ in model.named_parameters()]
    base = {}
    for name, p in model.named_parameters():
        centre = 1.0 if "norm" in name else 0.0
        base[name] = np.round((centre + 0.3 * rng.standard_normal(p.shape)) / GRID) * GRID
    paths = {}
    for i, key in enumerate(["base", "v1", "v2", "v3"]):
        with torch.no_grad():
            for name, p in model.named_parameters():
                w = base[name]
                if i:
                    n = w.size
                    ints = rng.choice(2 ** 18 - 1, n, replace=False) + 1  # distinct magnitudes
                    w = w + (rng.choice([-1.0, 1.0], n) * ints * STEP).reshape(w.shape)
                assert np.all(np.abs(w) < 4)  # so base + tau is exact on the 2**-22 grid
                p.copy_(torch.from_numpy(w.astype(np.float32)))
        paths[key] = root / key
        model.save_pretrained(paths[key])
    assert names == [n for n, _ in model.named_parameters()]
    return paths


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return _write_models(tmp_path_factory.mktemp("mk-inputs"))


@pytest.fixture(scope="module")
def mergekit_out(models, tmp_path_factory):
    """{case: mergekit's output dir, or its traceback}: every case in one mergekit process."""
    root = tmp_path_factory.mktemp("mk-out")
    jobs = []
    for case, text in CASES.items():
        cfg = root / f"{case}.yml"
        cfg.write_text(text.format(**{k: str(v) for k, v in models.items()}) + "dtype: float32\n")
        jobs.append((cfg, root / case))
    errors = run_mergekit_many(jobs)
    return {case: errors.get(str(cfg), out) for (cfg, out), case in zip(jobs, CASES)}


def _tensors(d) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _compare(jm: dict, mk: dict, case: str) -> None:
    """Same tensor names and shapes; values within float32 rounding of the tensor's scale."""
    assert sorted(jm) == sorted(mk), case
    worst = []
    for name in mk:
        a, b = jm[name].astype(np.float64), mk[name].astype(np.float64)
        assert a.shape == b.shape and jm[name].dtype == mk[name].dtype == np.float32, (case, name)
        scale = max(float(np.abs(b).max()), 1e-30)
        diff = float(np.abs(a - b).max())
        if diff > 2e-6 * scale:  # ~16 float32 ulps of the tensor's largest entry
            worst.append(f"{name}: max |jmerge - mergekit| = {diff:.3g} (scale {scale:.3g}, "
                         f"{int((np.abs(a - b) > 2e-6 * scale).sum())} of {a.size} entries)")
    assert not worst, f"{case}:\n" + "\n".join(worst)


def _jmerge(config, out, mode):
    from jmerge.engine import merge
    merge(config, out, mode=mode, force=True)
    return _tensors(out)


@pytest.mark.parametrize("case", list(CASES))
def test_jmerge_equals_mergekit(case, mergekit_out, tmp_path):
    mk_dir = mergekit_out[case]
    assert not isinstance(mk_dir, str), f"mergekit failed on {case}:\n{mk_dir}"
    mk = _tensors(mk_dir)
    cfg = mk_dir.parent / f"{case}.yml"
    for mode in ("stream", "memory") if case in BOTH_MODES else ("stream",):
        _compare(_jmerge(cfg, tmp_path / mode, mode), mk, f"{case} ({mode})")


def test_counts_case_is_where_rounding_differs(models, mergekit_out):
    """The ties_counts case keeps mergekit's int() counts, which round half up would not: 6 of 20
    (not 7) of each input_layernorm at density 0.33, 1 (not 0) of each post-attention norm at
    0.02, and half of every other tensor. Counted on mergekit's own output, so the differential
    test above covers the rounding."""
    mk = _tensors(mergekit_out["ties_counts"])
    base = _tensors(models["base"])
    for name, w in mk.items():
        kept = int((w != base[name]).sum())
        density = (0.33 if "input_layernorm" in name else 0.02 if "post_attention" in name else 0.5)
        n = w.size
        assert kept == max(1, int(density * n)), name
        if "norm" in name and "layers" in name:
            assert kept != math.floor(density * n + 0.5), name
