"""The flax-free params layout equals the Llama module's own abstract state, for every switch
in the config that adds, drops or reshapes a tensor."""

import itertools

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from jmerge.config import ModelConfig
from jmerge.models import llama
from jmerge.models.layout import abstract_params


def module_shapes(cfg, dtype):
    model = nnx.eval_shape(lambda: llama.LlamaForCausalLM(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    return jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), nnx.to_pure_dict(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("tie,qkv,o,mlp,qk", list(itertools.product([False, True], repeat=5))[::3])
def test_layout_matches_module(tie, qkv, o, mlp, qk):
    cfg = ModelConfig(family="llama", vocab_size=40, hidden_size=16, intermediate_size=24, num_layers=3,
                      num_heads=4, num_kv_heads=2, head_dim=6, tie_word_embeddings=tie, qkv_bias=qkv,
                      o_bias=o, mlp_bias=mlp, qk_norm=qk)
    for dtype in (jnp.float32, jnp.bfloat16):
        got, want = abstract_params(cfg, dtype), module_shapes(cfg, dtype)
        assert jax.tree.structure(got) == jax.tree.structure(want)
        assert jax.tree.leaves(got) == jax.tree.leaves(want)


def test_merge_path_imports_no_flax():
    """`jmerge merge` and `jmerge check` pay no flax import (~0.3 s of a small merge)."""
    import subprocess
    import sys
    code = "import sys, jmerge.engine, jmerge.check, jmerge.cli.merge; print('flax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
