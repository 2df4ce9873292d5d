"""Checkpoint I/O: HF round trip, transformers reload, orbax across meshes, PEFT, sharding."""

import copy
import json

import jax
import numpy as np
import pytest
import torch

from conftest import padded_batch
from jmerge import sharding
from jmerge.io import hf, load_model, orbax_io
from jmerge.io.safetensors_io import Checkpoint
from jmerge.models import llama


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_hf_round_trip_is_byte_identical(dtype, torch_model, tmp_path):
    """A tiny qwen2 saved by transformers in 16 bits, sharded with an index -> pytree -> HF."""
    src = tmp_path / "src"
    # A copy: casting the shared reference model would also round its RoPE buffers.
    copy.deepcopy(torch_model("qwen2")).to(getattr(torch, dtype)).save_pretrained(src, max_shard_size="20KB")
    assert (src / "model.safetensors.index.json").exists()
    m = load_model(src)
    assert jax.tree.leaves(m.params)[0].dtype == jax.numpy.dtype(dtype)
    out = hf.save_hf(m.params, m.cfg, tmp_path / "out", max_shard_size="30KB")
    a, b = Checkpoint(src), Checkpoint(out)
    assert sorted(a.names()) == sorted(b.names())
    for n in a.names():
        assert a.array(n).tobytes() == b.array(n).tobytes(), n
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(a.names())


def test_export_loads_in_transformers(tiny_model_dir, torch_model, tmp_path):
    from transformers import AutoModelForCausalLM
    m = load_model(tiny_model_dir("qwen3"))
    out = hf.save_hf(m.params, m.cfg, tmp_path / "out", max_shard_size="40KB")
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor(padded_batch(m.cfg.vocab_size, [5])[0])
    with torch.no_grad():
        np.testing.assert_allclose(reloaded(ids).logits.numpy(), torch_model("qwen3")(ids).logits.numpy(), atol=1e-6)


def test_sharded_forward_equals_single_device(tiny_model_dir):
    assert jax.device_count() == 8
    path = tiny_model_dir("llama")
    ids, mask, _ = padded_batch(97, [7, 4, 6, 3, 7, 2, 5, 1])
    fwd = jax.jit(lambda p, i, a, cfg=load_model(path).cfg: llama.forward(p, cfg, i, a))
    single = np.asarray(fwd(load_model(path).params, ids, mask))
    for spec in ("fsdp=8", "fsdp=4,tensor=2", "data=2,fsdp=2,tensor=2"):
        m = load_model(path, mesh=sharding.make_mesh(spec))
        q = m.params["model"]["layers"]["self_attn"]["q_proj"]["weight"]
        assert len(q.sharding.device_set) == 8 and not q.sharding.is_fully_replicated
        got = np.asarray(fwd(m.params, ids, mask))
        np.testing.assert_allclose(got, single, atol=2e-5, err_msg=spec)


def test_orbax_restores_onto_another_mesh(tiny_model_dir, tmp_path):
    path = tiny_model_dir("llama")
    m = load_model(path, mesh=sharding.make_mesh("fsdp=8"))
    orbax_io.save_orbax(m.params, m.cfg, tmp_path / "ck", tokenizer_writer=m.write_tokenizer)
    mesh = sharding.make_mesh("fsdp=2,tensor=4")
    back = load_model(tmp_path / "ck", mesh=mesh)
    for a, b in zip(jax.tree.leaves(m.params), jax.tree.leaves(back.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert b.sharding.mesh.shape == mesh.shape


def _write_adapter(d, base_cfg, rank=2, alpha=4.0, seed=0):
    """A PEFT-format LoRA adapter on q_proj/v_proj of every layer (written by hand)."""
    from safetensors.numpy import save_file
    rng = np.random.RandomState(seed)
    d.mkdir()
    tensors = {}
    for i in range(base_cfg.num_layers):
        for mod, out in (("q_proj", base_cfg.num_heads * base_cfg.head_dim), ("v_proj", base_cfg.num_kv_heads * base_cfg.head_dim)):
            pre = f"base_model.model.model.layers.{i}.self_attn.{mod}"
            tensors[f"{pre}.lora_A.weight"] = rng.randn(rank, base_cfg.hidden_size).astype(np.float32)
            tensors[f"{pre}.lora_B.weight"] = rng.randn(out, rank).astype(np.float32)
    save_file(tensors, d / "adapter_model.safetensors")
    (d / "adapter_config.json").write_text(json.dumps(dict(
        peft_type="LORA", r=rank, lora_alpha=alpha, target_modules=["q_proj", "v_proj"])))
    return tensors


def test_peft_adapter_adds_scaled_dense_delta(tiny_model_dir, tmp_path):
    base_dir = tiny_model_dir("llama")
    base = load_model(base_dir)
    t = _write_adapter(tmp_path / "ad", base.cfg)
    merged = load_model(f"{base_dir}+{tmp_path / 'ad'}")
    q0 = np.asarray(base.params["model"]["layers"]["self_attn"]["q_proj"]["weight"][1])
    q1 = np.asarray(merged.params["model"]["layers"]["self_attn"]["q_proj"]["weight"][1])
    pre = "base_model.model.model.layers.1.self_attn.q_proj"
    want = q0 + (4.0 / 2) * t[f"{pre}.lora_B.weight"] @ t[f"{pre}.lora_A.weight"]
    np.testing.assert_allclose(q1, want, rtol=1e-6, atol=1e-6)
    k0 = base.params["model"]["layers"]["self_attn"]["k_proj"]["weight"]
    np.testing.assert_array_equal(np.asarray(merged.params["model"]["layers"]["self_attn"]["k_proj"]["weight"]), np.asarray(k0))
    # An adapter dir alone works when given its base.
    again = load_model(tmp_path / "ad", base=base_dir)
    np.testing.assert_array_equal(np.asarray(again.params["model"]["layers"]["self_attn"]["q_proj"]["weight"][1]), q1)


def test_run_checkpoint_under_a_relative_path(tmp_path, monkeypatch):
    """Search configs name their output relative to the working directory (`out: out/demo`);
    orbax refuses relative paths, so the checkpoint must make them absolute."""
    import jax.numpy as jnp

    from jmerge.checkpoint import RunCheckpoint
    monkeypatch.chdir(tmp_path)
    state = {"theta": jnp.arange(6.0).reshape(2, 3), "step_scale": jnp.float32(0.5)}
    ck = RunCheckpoint("out/run/checkpoints", "fp")
    ck.save(3, state)
    step, back = ck.restore(state)
    assert step == 3 and (tmp_path / "out/run/checkpoints/step_00000003").is_dir()
    np.testing.assert_array_equal(np.asarray(back["theta"]), np.asarray(state["theta"]))
