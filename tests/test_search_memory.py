"""The search's memory: batches padded to the mesh instead of replicated (same loss), and compiled
programs that hold no float32 copy of the models (`search_programs`, abstract inputs)."""

import jax
import jax.numpy as jnp
import numpy as np

from jmerge import data
from jmerge import sharding as shd
from jmerge.config import from_hf_dict
from jmerge.io import load_model
from jmerge.models import llama
from jmerge.search import gradient as G
from jmerge.search.parametrisations import Coefficients, Masks
from jmerge.search.preference import Preference


def _examples(n, vocab, seed, prompt=3, answer=4):
    rng = np.random.default_rng(seed)
    return [data.Example(rng.integers(1, vocab, prompt + answer).astype(np.int32),
                         np.r_[np.zeros(prompt), np.ones(answer)].astype(np.int32)) for _ in range(n)]


def test_rows_not_dividing_the_mesh_are_padded_and_the_loss_is_unchanged(tiny_model_dir):
    """3 CE rows, 6 DPO rows, 1 CE + 2 joined preference rows on a 4-device mesh: each batch is
    split over the devices with zero-weight rows, and every objective's first loss equals the
    one without a mesh."""
    path = tiny_model_dir("llama")
    mesh = shd.make_mesh({"data": 1, "fsdp": 4, "tensor": 1})
    plain, placed = load_model(path), load_model(path, mesh=mesh)
    vocab = plain.cfg.vocab_size
    expert = jax.tree.map(lambda x: x * 1.5, plain.params)
    typed = {"a": (_examples(5, vocab, 0), 1.0)}
    prefs = [Preference(c, r) for c, r in zip(_examples(4, vocab, 1), _examples(4, vocab, 2))]
    cases = {"ce": (_spec(batch_size=3), typed, None),
             "dpo": (_spec(batch_size=3, objective="dpo"), {"p": (prefs, 1.0)}, None),
             "joined": (_spec(batch_size=1), typed, (prefs, 0.5))}
    for name, (spec, types, joined) in cases.items():
        losses = []
        for m in (plain, placed):
            ex = jax.tree.map(lambda x, b: jax.device_put(x * 1.5, b.sharding), plain.params, m.params) \
                if m is placed else expert
            param = Coefficients(k=1)
            s = G.GradientSearch(m.cfg, m.params, [ex], param, spec, param.theta0(m.cfg.num_layers),
                                 reference=m.params)
            log = []
            s.fit(types, progress=False, log=log, prefs=joined)
            losses.append(log[0]["loss"])
            if m is placed:
                batch = s._device_batch(next(s.streams(types, 0)))
                ids = batch["input_ids"]
                assert ids.shape[0] % 4 == 0 and tuple(ids.sharding.spec)[0] == ("data", "fsdp"), name
        # Sums over rows split four ways instead of one: float32 rounding apart.
        np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5, err_msg=name)


def _spec(**kw):
    return G.SearchSpec(steps=1, lr=1e-2, **kw)


def test_padded_rows_carry_no_weight_and_go_before_the_triples():
    mesh = shd.make_mesh({"data": 1, "fsdp": 4, "tensor": 1})
    ids = np.arange(1, 31, dtype=np.int32).reshape(3, 10)
    host = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": np.ones_like(ids),
            "weight": np.ones(ids.shape, np.float32), "pref_weight": np.float32(2)}
    padded = G._padded(host, mesh, tail=2)
    assert padded["input_ids"].shape == (4, 10)
    np.testing.assert_array_equal(padded["input_ids"][[0, 2, 3]], ids)  # the triples stay last
    assert not padded["weight"][1].any() and not padded["loss_mask"][1].any()
    assert padded["attention_mask"][1].all()  # a pad row attends to its own tokens: no empty softmax
    assert padded["pref_weight"] == 2


def _abstract(cfg, dtype, mesh):
    shapes = jax.eval_shape(lambda: llama.init_params(cfg, dtype=dtype))
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes,
                        shd.param_shardings(shapes, mesh))


def test_search_programs_hold_no_float32_copy_of_the_models():
    """Compiled from abstract bf16 models (no weight exists): the step's and the export's
    temporaries stay below one float32 copy of the base's layers (61 MB), where XLA once hoisted
    the merge's float32 casts out of the layer loop: base and task vectors whole in float32.
    (Measured: step 40 MB, of it 8 MB the layer inputs kept for the backward pass; the logits'
    share is test_chunked_ce's.)"""
    mesh = shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1})
    hf = dict(architectures=["LlamaForCausalLM"], model_type="llama", rms_norm_eps=1e-5, max_position_embeddings=4096,
              hidden_size=256, intermediate_size=1024, num_hidden_layers=16, num_attention_heads=8,
              num_key_value_heads=2, tie_word_embeddings=False, vocab_size=512)
    cfg = from_hf_dict(hf)
    base = _abstract(cfg, jnp.bfloat16, mesh)
    layers_f32 = sum(x.size for x in jax.tree.leaves(base["model"]["layers"])) * 4
    modules = ("down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj")
    for param, k in ((Coefficients(k=2, modules=modules), 2), (Masks(k=1, lam=(1.0,), granularity="row"), 1)):
        programs = G.search_programs(cfg, base, [base] * k, param, G.SearchSpec(batch_size=2), 8, 64, reference=base)
        assert set(programs) == {"step", "reference", "export:layers", "export:rest"}
        for name in ("step", "export:layers", "export:rest"):
            temp = programs[name].compile().memory_analysis().temp_size_in_bytes
            assert temp < layers_f32, (type(param).__name__, name, temp, layers_f32)
