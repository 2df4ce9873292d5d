"""The Flax model against transformers' PyTorch model, float32, per family."""

import dataclasses

import jax
import numpy as np
import pytest
import torch

from conftest import padded_batch
from jmerge.io import load_model
from jmerge.models import llama

FAMILIES = ["llama", "llama3", "mistral", "qwen2", "qwen3"]

# Measured on the tiny models (logits up to ~0.7): the two implementations agree to at most
# 1.5e-7 (llama; 0.9e-7 to 1.2e-7 for the others), a few float32 ulps. 1e-6 leaves a 6.7x margin
# for another BLAS and still rejects a doubled rope_theta in every family, whose smallest effect
# is 2.4e-6 (llama3, where the llama3 scaling damps it; 3.8e-5 to 7e-3 elsewhere).
ATOL = 1e-6


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(family, tiny_model_dir, torch_model):
    m = load_model(tiny_model_dir(family))
    # 9 tokens with padding: longer than mistral's window (4), so the window is exercised.
    ids, mask, pos = padded_batch(m.cfg.vocab_size, [9, 6, 2])
    with torch.no_grad():
        ref = torch_model(family)(torch.tensor(ids), attention_mask=torch.tensor(mask),
                                  position_ids=torch.tensor(pos)).logits.numpy()
    fwd = jax.jit(lambda p, i, a, cfg: llama.forward(p, cfg, i, a), static_argnums=3)
    out = np.asarray(fwd(m.params, ids, mask, m.cfg))
    diff = np.abs(out - ref)[mask.astype(bool)]
    assert diff.max() <= ATOL, f"{family}: max |dlogit| {diff.max():.2e}"
    # The tolerance bites: a model with a real bug of the smallest size it is meant to catch
    # (rope_theta doubled) is rejected by it.
    wrong = np.asarray(fwd(m.params, ids, mask, dataclasses.replace(m.cfg, rope_theta=2 * m.cfg.rope_theta)))
    assert np.abs(wrong - ref)[mask.astype(bool)].max() > ATOL, family


def test_config_flags_follow_family(tiny_model_dir):
    cfgs = {f: load_model(tiny_model_dir(f)).cfg for f in FAMILIES}
    assert cfgs["qwen2"].qkv_bias and not cfgs["qwen2"].o_bias
    assert cfgs["qwen3"].qk_norm and cfgs["qwen3"].head_dim == 16
    assert cfgs["mistral"].layer_windows == (4, 4, 4)
    assert cfgs["llama3"].rope_type == "llama3" and cfgs["llama3"].tie_word_embeddings
    assert "lm_head" not in load_model(tiny_model_dir("llama3")).params


def test_cached_decode_equals_full_forward(tiny_model_dir):
    """Prefill + one-token steps through the KV cache give the full-sequence logits."""
    m = load_model(tiny_model_dir("mistral"))
    ids, mask, _ = padded_batch(m.cfg.vocab_size, [8, 5])
    full = llama.forward(m.params, m.cfg, ids, mask)
    cache = llama.init_cache(m.cfg, 2, 8)
    step = jax.jit(lambda p, i, a, c: llama.forward(p, m.cfg, i, a, cache=c))
    logits, cache = step(m.params, ids[:, :5], mask[:, :5], cache)
    outs = [logits]
    for t in range(5, 8):
        logits, cache = step(m.params, ids[:, t:t + 1], mask[:, t:t + 1], cache)
        outs.append(logits)
    got = np.concatenate([np.asarray(o) for o in outs], axis=1)
    # measured 4.5e-8 on logits up to ~0.5: 5e-7 leaves an 11x margin
    np.testing.assert_allclose(got[mask.astype(bool)], np.asarray(full)[mask.astype(bool)], rtol=0, atol=5e-7)


def test_v5_rope_parameters_accepted():
    from jmerge.config import from_hf_dict
    base = dict(architectures=["LlamaForCausalLM"], vocab_size=10, hidden_size=8, intermediate_size=16,
                num_hidden_layers=1, num_attention_heads=2)
    v4 = from_hf_dict(dict(base, rope_theta=5e5, rope_scaling=dict(rope_type="llama3", factor=8.0)))
    v5 = from_hf_dict(dict(base, rope_parameters=dict(rope_theta=5e5, rope_type="llama3", factor=8.0)))
    assert v4.rope_theta == v5.rope_theta == 5e5 and v4.rope_type == v5.rope_type == "llama3"
    np.testing.assert_array_equal(v4.inv_freq(), v5.inv_freq())
