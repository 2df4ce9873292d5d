"""Generation memory: batches padded to the mesh instead of replicated, the KV cache split by
heads, the prompt prefilled in chunks, and `generation_programs` lowering exactly the programs a
Generator compiles (what `--dry-run` measures)."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from conftest import padded_batch
from jmerge import generate as G
from jmerge import sharding as shd
from jmerge.io import load_model
from jmerge.models import llama

NEW, EOS = 8, (2,)


def one_device_mesh():
    return shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1})


def prompts_of(vocab, lengths):
    ids, mask, _ = padded_batch(vocab, lengths)
    return [row[m == 1].tolist() for row, m in zip(ids, mask)]


def tokens(gen, prompts):
    return [c.tokens for c in gen.generate_ids(prompts)]


def test_mesh_batch_is_padded_and_cache_split_by_heads(tiny_model_dir):
    """3 prompts on fsdp=4 x tensor=2: 4 rows (one all-padding, dropped), one per fsdp device,
    KV heads over tensor; the tokens of one device."""
    m = load_model(tiny_model_dir("llama"), mesh=one_device_mesh())
    prompts = prompts_of(m.cfg.vocab_size, [9, 5, 2])
    kw = dict(max_new_tokens=NEW, eos_ids=EOS, batch_size=3)
    ref = tokens(G.Generator(m.cfg, m.params, mesh=one_device_mesh(), **kw), prompts)
    gen = G.Generator(m.cfg, m.params, mesh=shd.make_mesh("fsdp=4,tensor=2"), **kw)
    assert tokens(gen, prompts) == ref
    (cache,) = gen._caches.values()
    k = cache["k"]
    assert k.sharding.spec == P(None, ("data", "fsdp"), None, "tensor", None)
    layers, rows, slots, heads, dim = k.shape
    assert rows == 4 and heads == m.cfg.num_kv_heads
    assert {s.data.shape for s in k.addressable_shards} == {(layers, 1, slots, heads // 2, dim)}


def test_all_padding_rows_stay_finite(tiny_model_dir):
    """A row whose mask is all 0 (mesh padding) gives finite logits, with and without a cache,
    and leaves the real rows' logits as they are."""
    m = load_model(tiny_model_dir("llama"), mesh=one_device_mesh())
    ids, mask, _ = padded_batch(m.cfg.vocab_size, [5, 3])
    ids_d, mask_d = np.concatenate([ids, ids[:1] * 0]), np.concatenate([mask, mask[:1] * 0])
    real = np.asarray(llama.forward(m.params, m.cfg, ids, mask))
    both = np.asarray(llama.forward(m.params, m.cfg, ids_d, mask_d))
    assert np.isfinite(both).all()
    np.testing.assert_allclose(both[:2], real, rtol=1e-5, atol=1e-5)
    cache = llama.init_cache(m.cfg, 3, ids.shape[1] + 2)
    last, _ = llama.forward(m.params, m.cfg, ids_d, mask_d, cache=cache, last_only=True)
    assert np.isfinite(np.asarray(last)).all()


def test_chunked_prefill_gives_the_same_tokens(tiny_model_dir, monkeypatch):
    """The prompt prefilled 4 slots at a time (4 calls over a 16-slot bucket) gives the tokens
    of one call, with a sliding window (mistral's 4) reaching across the chunks too."""
    for family in ("llama", "mistral"):
        m = load_model(tiny_model_dir(family), mesh=one_device_mesh())
        prompts = prompts_of(m.cfg.vocab_size, [9, 5, 2, 7])
        kw = dict(mesh=one_device_mesh(), max_new_tokens=NEW, eos_ids=EOS, batch_size=4)
        whole = tokens(G.Generator(m.cfg, m.params, **kw), prompts)
        monkeypatch.setattr(G, "PREFILL_TOKENS", 16)
        assert G.prefill_chunk(4, 16, one_device_mesh()) == 4
        assert tokens(G.Generator(m.cfg, m.params, **kw), prompts) == whole, family
        monkeypatch.undo()


def test_generation_programs_are_what_the_generator_compiles(tiny_model_dir, monkeypatch):
    """Lowered from abstract params, the programs are the Generator's own (same text), and their
    memory analysis counts a quarter of the rows and half the KV heads per device."""
    m = load_model(tiny_model_dir("llama"), mesh=one_device_mesh())
    mesh = shd.make_mesh("fsdp=4,tensor=2")
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), m.params)
    programs = G.generation_programs(m.cfg, abstract, mesh, 3, 9, NEW, G.Sampling())
    assert set(programs) == {"cache_init", "generate"}

    seen = {}
    real_generate, real_init = G._generate_jit, G._cache_init

    def spy_generate(*args, **kw):
        seen["generate"] = real_generate.lower(*args, **kw).as_text()
        return real_generate(*args, **kw)

    def spy_init(*args):
        init = real_init(*args)
        seen["cache_init"] = init.lower().as_text()
        return init

    monkeypatch.setattr(G, "_generate_jit", spy_generate)
    monkeypatch.setattr(G, "_cache_init", spy_init)
    gen = G.Generator(m.cfg, m.params, mesh=mesh, max_new_tokens=NEW, eos_ids=EOS, batch_size=3)
    gen.generate_ids(prompts_of(m.cfg.vocab_size, [9, 5, 2]))
    assert seen == {name: low.as_text() for name, low in programs.items()}

    cache = programs["cache_init"].compile().memory_analysis()
    c = m.cfg
    per_device_kv = c.num_layers * 1 * (16 + NEW) * (c.num_kv_heads // 2) * c.head_dim * 4
    assert 2 * per_device_kv <= cache.output_size_in_bytes < 2 * per_device_kv + 1024
