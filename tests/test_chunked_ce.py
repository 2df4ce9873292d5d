"""The vocabulary-sliced log-probabilities (objectives.target_logprobs): the dense formula's values
and gradients, and no [B, T, V] float32 logits in the compiled program."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmerge import objectives as O
from jmerge.models import llama


def dense(states, head, targets):
    """What the objectives computed before: whole logits, log_softmax, pick."""
    logits = jnp.einsum("btd,vd->btv", states, head, preferred_element_type=jnp.float32)
    return jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), targets[..., None], axis=-1)[..., 0]


def test_sliced_logprobs_equal_the_dense_formula_and_its_gradients():
    rng = np.random.default_rng(0)
    b, t, d, v = 3, 6, 8, 97  # a prime vocabulary: every slicing but 1 and 97 pads the head
    states = jnp.asarray(rng.normal(0, 1, (b, t, d)), jnp.float32)
    head = jnp.asarray(rng.normal(0, 1, (v, d)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32)
    g = jnp.asarray(rng.normal(0, 1, (b, t)), jnp.float32)
    want = dense(states, head, targets)
    want_grads = jax.grad(lambda s, h: jnp.sum(dense(s, h, targets) * g), argnums=(0, 1))(states, head)
    for slices in (None, 1, 2, 7, 10, 97):
        f = jax.jit(lambda s, h: O.target_logprobs(s, h, targets, slices))  # noqa: B023
        got = f(states, head)
        # Measured: one slice gives the same bits (log_softmax's own order); more slices differ
        # by <= 1e-6 absolute on values of ~-5 (an online logsumexp); rtol 1e-5 leaves 10x.
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, err_msg=str(slices))
        if slices in (None, 1):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        grads = jax.grad(lambda s, h: jnp.sum(f(s, h) * g), argnums=(0, 1))(states, head)  # noqa: B023
        for a, w in zip(grads, want_grads):  # measured <= 1e-6 absolute on gradients up to ~3
            np.testing.assert_allclose(np.asarray(a), np.asarray(w), rtol=1e-5, atol=1e-5, err_msg=str(slices))


def test_model_objectives_equal_the_logit_formula(tiny_model_dir):
    """sequence_logprob / response_ce (SFT, DPO's reference) from the hidden states and the head
    equal the old formula on the model's logits, values and gradients."""
    from jmerge.io import load_model
    for family in ("llama", "llama3"):  # lm_head, and a head tied to the embedding
        m = load_model(tiny_model_dir(family))
        rng = np.random.default_rng(1)
        ids = jnp.asarray(rng.integers(1, m.cfg.vocab_size, (3, 9)), jnp.int32)
        batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids),
                 "loss_mask": jnp.asarray(np.r_[[0] * 4, [1] * 5][None].repeat(3, 0), jnp.int32)}

        def old(params):
            logits = llama.forward(params, m.cfg, ids, batch["attention_mask"])
            return jnp.sum(O.token_logprobs(logits, ids) * batch["loss_mask"], axis=1)
        got = jax.jit(lambda p: O.sequence_logprob(p, m.cfg, batch)[0])(m.params)
        np.testing.assert_allclose(np.asarray(got), np.asarray(jax.jit(old)(m.params)), rtol=1e-5)
        g_new = jax.jit(jax.grad(lambda p: O.response_ce(p, m.cfg, batch)[0]))(m.params)
        g_old = jax.jit(jax.grad(lambda p: -jnp.sum(old(p))))(m.params)
        for (path, a), w in zip(jax.tree_util.tree_flatten_with_path(g_new)[0], jax.tree.leaves(g_old)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(w), rtol=1e-5, atol=1e-6, err_msg=f"{family} {path}")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_no_whole_logits_in_the_compiled_program(dtype):
    """fwd + bwd of the sliced log-probabilities at 8 x 1024 tokens and a 64k vocabulary: the
    float32 [B, T, V] logits (2 GiB) exist in neither pass."""
    b, t, d, v = 8, 1024, 64, 65536
    states = jax.ShapeDtypeStruct((b, t, d), dtype)
    head = jax.ShapeDtypeStruct((v, d), dtype)
    targets = jax.ShapeDtypeStruct((b, t), jnp.int32)
    fn = jax.jit(jax.value_and_grad(lambda s, h, y: jnp.sum(O.target_logprobs(s, h, y)), argnums=(0, 1)))
    temp = fn.lower(states, head, targets).compile().memory_analysis().temp_size_in_bytes
    whole = b * t * v * 4
    assert temp < whole / 2, (temp, whole)
