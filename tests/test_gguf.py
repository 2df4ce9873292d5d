"""GGUF reading: tiny files written with gguf.GGUFWriter, plus an oracle test on real SmolLM2 weights."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import gguf
import numpy as np
import pytest

from jmerge.errors import JmergeError
from jmerge.io.gguf import llama3_rope_scaling, read_gguf

T = gguf.GGMLQuantizationType

# Tiny llama with GQA: 4 query heads, 2 KV heads, head_dim 16. Every matrix's input width is a
# multiple of 32, the block size of the legacy quant formats.
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, LAYERS = 64, 4, 2, 16, 96, 2
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB = 256 + 1 + len(SPECIALS)  # byte alphabet, one merge ("ab"), special tokens
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _byte_alphabet() -> list[str]:
    """GPT-2's printable stand-in for each byte value, in byte order (its published table)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]


def hf_weights(tied: bool, seed: int = 0) -> dict[str, np.ndarray]:
    """Random HF-layout weights of the tiny model."""
    rng = np.random.default_rng(seed)
    w = {"model.embed_tokens.weight": rng.normal(size=(VOCAB, HIDDEN)), "model.norm.weight": 1 + 0.1 * rng.normal(size=HIDDEN)}
    if not tied:
        w["lm_head.weight"] = rng.normal(size=(VOCAB, HIDDEN))
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = 1 + 0.1 * rng.normal(size=HIDDEN)
        w[p + "post_attention_layernorm.weight"] = 1 + 0.1 * rng.normal(size=HIDDEN)
        w[p + "self_attn.q_proj.weight"] = rng.normal(size=(HEADS * HEAD_DIM, HIDDEN))
        w[p + "self_attn.k_proj.weight"] = rng.normal(size=(KV_HEADS * HEAD_DIM, HIDDEN))
        w[p + "self_attn.v_proj.weight"] = rng.normal(size=(KV_HEADS * HEAD_DIM, HIDDEN))
        w[p + "self_attn.o_proj.weight"] = rng.normal(size=(HIDDEN, HEADS * HEAD_DIM))
        w[p + "mlp.gate_proj.weight"] = rng.normal(size=(FFN, HIDDEN))
        w[p + "mlp.up_proj.weight"] = rng.normal(size=(FFN, HIDDEN))
        w[p + "mlp.down_proj.weight"] = rng.normal(size=(HIDDEN, FFN))
    return {k: v.astype(np.float32) for k, v in w.items()}


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's q/k row order, by explicit index arithmetic: within each head, row 2i+j of the
    file is row j*(d/2)+i of the HF weight (RoPE pairs interleaved instead of split in halves)."""
    d = w.shape[0] // n_heads
    out = np.empty_like(w)
    for h in range(n_heads):
        for i in range(d // 2):
            for j in range(2):
                out[h * d + 2 * i + j] = w[h * d + j * (d // 2) + i]
    return out


_GGUF_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_name(hf: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
    if hf in top:
        return top[hf]
    _, _, i, rest = hf.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{i}.{_GGUF_NAMES[module]}.{kind}"


def write_tiny(path: Path, weights: dict, qtype=T.F32, *, arch: str = "llama", permute: bool = True,
               extra_kv=None, extra_tensors=()) -> Path:
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(500000.0)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_vocab_size(VOCAB)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(_byte_alphabet() + ["ab"] + SPECIALS)
    w.add_token_types([1] * 257 + [3] * len(SPECIALS))
    w.add_token_merges(["a b"])
    w.add_bos_token_id(258)
    w.add_eos_token_id(259)
    w.add_pad_token_id(259)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    for fn in extra_kv or ():
        fn(w)
    for name, x in weights.items():
        if permute and name.endswith("q_proj.weight"):
            x = llama_cpp_permute(x, HEADS)
        elif permute and name.endswith("k_proj.weight"):
            x = llama_cpp_permute(x, KV_HEADS)
        if x.ndim == 1 or qtype == T.F32:  # llama.cpp keeps norms in F32 whatever the file type
            w.add_tensor(gguf_name(name), x)
        else:
            w.add_tensor(gguf_name(name), gguf.quants.quantize(x, qtype), raw_dtype=qtype)
    for name, x, raw in extra_tensors:
        w.add_tensor(name, x, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def block_error_bound(x: np.ndarray, qtype) -> np.ndarray:
    """Largest dequantization error each element may have, from each format's published rule
    (ggml-quants.c), per block of 32 along the input axis; f16 scales add a little slack."""
    if qtype == T.F32:
        return np.zeros_like(x)
    if qtype == T.F16:
        return np.abs(x) * 2.0**-11 + 1e-7
    if qtype == T.BF16:
        return np.abs(x) * 2.0**-8
    blocks = x.reshape(*x.shape[:-1], -1, 32)
    amax = np.abs(blocks).max(-1, keepdims=True)
    lo, hi = blocks.min(-1, keepdims=True), blocks.max(-1, keepdims=True)
    if qtype == T.Q8_0:  # d = amax/127, q = round(x/d): half a step, plus d rounded to f16
        bound = amax / 127 * (0.5 + 127 * 2.0**-11)
    elif qtype == T.Q4_0:  # d = max/-8, q = clip(round(x/d) + 8, 0, 15): up to one step at the clip
        bound = amax / 8 * (1 + 16 * 2.0**-11)
    elif qtype == T.Q4_1:  # d = (max-min)/15, m = min: half a step, plus f16 rounding of d and m
        d = (hi - lo) / 15
        bound = d * (0.5 + 16 * 2.0**-11) + np.abs(lo) * 2.0**-11
    else:
        raise AssertionError(qtype)
    return np.broadcast_to(bound * 1.01 + 1e-6, blocks.shape).reshape(x.shape)


@pytest.fixture(scope="module")
def weights():
    return hf_weights(tied=False)


QTYPES = [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1]


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda q: q.name)
def test_read_back_within_quantization_error(tmp_path, weights, qtype):
    m = read_gguf(write_tiny(tmp_path / "m.gguf", weights, qtype))
    assert sorted(m.tensor_names()) == sorted(weights)
    for name, want in weights.items():
        got = m.tensor(name)
        assert got.shape == want.shape, name
        if qtype == T.F16 and want.ndim == 2:
            assert got.dtype == np.float16
        err = np.abs(got.astype(np.float64) - want)
        bound = block_error_bound(want, qtype if want.ndim == 2 else T.F32)
        assert (err <= bound).all(), f"{name}: max excess {(err - bound).max()}"
    if qtype == T.F32:  # exact: the permutation undo is a pure row reordering
        for name in ("model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"):
            np.testing.assert_array_equal(m.tensor(name), weights[name])


def test_permutation_is_really_undone(tmp_path, weights):
    # Guard against a vacuous pass: the file's rows differ from HF's, and reading as qwen2 (which
    # llama.cpp never permutes) returns the file's order untouched.
    q = weights["model.layers.0.self_attn.q_proj.weight"]
    assert not np.array_equal(llama_cpp_permute(q, HEADS), q)
    m = read_gguf(write_tiny(tmp_path / "q.gguf", weights, arch="qwen2"))
    np.testing.assert_array_equal(m.tensor("model.layers.0.self_attn.q_proj.weight"), llama_cpp_permute(q, HEADS))
    assert m.config["architectures"] == ["Qwen2ForCausalLM"]

    unpermuted = read_gguf(write_tiny(tmp_path / "q2.gguf", weights, arch="qwen2", permute=False))
    np.testing.assert_array_equal(unpermuted.tensor("model.layers.0.self_attn.k_proj.weight"),
                                  weights["model.layers.0.self_attn.k_proj.weight"])


def test_qwen3_norms_and_head_dim(tmp_path, weights):
    norms = [(f"blk.{i}.attn_{x}_norm.weight", np.full(HEAD_DIM, 1.5, np.float32), None)
             for i in range(LAYERS) for x in "qk"]
    m = read_gguf(write_tiny(tmp_path / "q3.gguf", weights, arch="qwen3", permute=False, extra_tensors=norms,
                             extra_kv=[lambda w: w.add_key_length(HEAD_DIM)]))
    assert m.config["architectures"] == ["Qwen3ForCausalLM"] and m.config["head_dim"] == HEAD_DIM
    np.testing.assert_array_equal(m.tensor("model.layers.1.self_attn.k_norm.weight"), np.full(HEAD_DIM, 1.5))
    np.testing.assert_array_equal(m.tensor("model.layers.1.self_attn.q_proj.weight"),
                                  weights["model.layers.1.self_attn.q_proj.weight"])


def test_config_from_metadata(tmp_path, weights):
    m = read_gguf(write_tiny(tmp_path / "m.gguf", weights, T.Q8_0))
    c = m.config
    assert c["architectures"] == ["LlamaForCausalLM"] and c["model_type"] == "llama"
    assert (c["vocab_size"], c["hidden_size"], c["intermediate_size"]) == (VOCAB, HIDDEN, FFN)
    assert (c["num_hidden_layers"], c["num_attention_heads"], c["num_key_value_heads"]) == (LAYERS, HEADS, KV_HEADS)
    assert c["head_dim"] == HEAD_DIM
    assert c["rms_norm_eps"] == 1e-5 and c["rope_theta"] == 500000.0
    assert c["max_position_embeddings"] == 256
    assert (c["bos_token_id"], c["eos_token_id"], c["pad_token_id"]) == (258, 259, 259)
    assert c["tie_word_embeddings"] is False and "rope_scaling" not in c
    json.dumps(c)  # must be writable as config.json


def test_tied_embeddings(tmp_path):
    w = hf_weights(tied=True)
    m = read_gguf(write_tiny(tmp_path / "t.gguf", w, T.Q4_1))
    assert m.config["tie_word_embeddings"] is True
    assert "lm_head.weight" not in m.tensor_names()


def test_linear_rope_scaling(tmp_path, weights):
    def linear(w):
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(2.0)

    m = read_gguf(write_tiny(tmp_path / "r.gguf", weights, extra_kv=[linear]))
    assert m.config["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}


def llama_cpp_rope_freqs(theta, dim, factor, lf, hf, old):
    """convert_hf_to_gguf's llama3 `rope_freqs` (divisors per frequency), transcribed."""
    out = []
    for i in range(0, dim, 2):
        freq = 1.0 / theta ** (i / dim)
        wavelen = 2 * math.pi / freq
        if wavelen < old / hf:
            out.append(1.0)
        elif wavelen > old / lf:
            out.append(factor)
        else:
            smooth = (old / wavelen - lf) / (hf - lf)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def hf_llama3_inv_freq(theta, dim, s):
    """transformers' _compute_llama3_parameters, transcribed."""
    inv = 1.0 / theta ** (np.arange(0, dim, 2) / dim)
    wavelen = 2 * math.pi / inv
    old, lf, hf, factor = s["original_max_position_embeddings"], s["low_freq_factor"], s["high_freq_factor"], s["factor"]
    scaled = np.where(wavelen > old / lf, inv / factor, inv)
    smooth = (old / wavelen - lf) / (hf - lf)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old / hf) & (wavelen <= old / lf)
    return np.where(medium, smoothed, scaled)


@pytest.mark.parametrize("params", [(8.0, 1.0, 4.0, 8192), (32.0, 1.0, 4.0, 8192), (16.0, 2.0, 6.0, 4096)])
def test_llama3_rope_scaling_recovered(params):
    theta, dim = 500000.0, 128
    factors = llama_cpp_rope_freqs(theta, dim, *params)
    s = llama3_rope_scaling(factors, theta, dim)
    assert s["rope_type"] == "llama3" and s["factor"] == params[0]
    truth = dict(zip(("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"), params))
    np.testing.assert_allclose(hf_llama3_inv_freq(theta, dim, s), hf_llama3_inv_freq(theta, dim, truth), rtol=1e-5)
    if params[1] == 1.0:  # representable exactly with low_freq_factor 1
        assert (s["high_freq_factor"], s["original_max_position_embeddings"]) == params[2:]


def test_llama3_rope_freqs_tensor_in_file(tmp_path, weights):
    freqs = llama_cpp_rope_freqs(500000.0, HEAD_DIM, 8.0, 1.0, 4.0, 8192)
    m = read_gguf(write_tiny(tmp_path / "l3.gguf", weights, extra_tensors=[("rope_freqs.weight", freqs, None)]))
    assert m.config["rope_scaling"]["rope_type"] == "llama3"
    assert "rope_freqs.weight" not in " ".join(m.tensor_names())
    with pytest.raises(JmergeError, match="rope_freqs"):
        bad = np.linspace(1, 8, HEAD_DIM // 2, dtype=np.float32) ** 2
        read_gguf(write_tiny(tmp_path / "bad.gguf", weights, extra_tensors=[("rope_freqs.weight", bad, None)]))


def test_tokenizer_files(tmp_path, weights):
    from transformers import AutoTokenizer

    m = read_gguf(write_tiny(tmp_path / "m.gguf", weights))
    out = tmp_path / "tok"
    m.save_tokenizer(out)
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == CHAT_TEMPLATE
    assert (cfg["bos_token"], cfg["eos_token"]) == ("<|im_start|>", "<|im_end|>")
    tok = AutoTokenizer.from_pretrained(str(out))
    # "ab ab" -> "ab" + "Ġab"; the only merge is a+b, so "Ġab" is Ġ (byte 32) then "ab" (id 256).
    assert tok("ab ab")["input_ids"] == [256, 32, 256]
    assert tok("<|im_end|>")["input_ids"] == [259]  # special tokens stay whole
    text = tok.apply_chat_template([{"role": "user", "content": "ab"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nab<|im_end|>\n<|im_start|>assistant\n"


# --- bad input: one JmergeError, never a traceback ----------------------------------------------


def test_unsupported_architecture(tmp_path, weights):
    with pytest.raises(JmergeError, match=r"unsupported GGUF architecture 'gpt2'.*llama"):
        read_gguf(write_tiny(tmp_path / "g.gguf", weights, arch="gpt2"))


def test_unsupported_quant_type(tmp_path, weights):
    # Q8_1 has a block layout but the gguf package cannot dequantize it.
    block, nbytes = gguf.GGML_QUANT_SIZES[T.Q8_1]
    raw = np.zeros((1, HEADS * HEAD_DIM // block * nbytes), dtype=np.uint8)
    path = write_tiny(tmp_path / "q.gguf", weights, extra_tensors=[("blk.0.attn_q.bias", raw, T.Q8_1)])
    with pytest.raises(JmergeError, match=r"unsupported GGUF tensor type Q8_1; supported: .*Q4_0.*Q4_1.*Q8_0"):
        read_gguf(path)


def test_unknown_tensor(tmp_path, weights):
    extra = [("blk.0.ffn_gate_exps.weight", np.zeros((2, 4), np.float32), None)]
    with pytest.raises(JmergeError, match="ffn_gate_exps"):
        read_gguf(write_tiny(tmp_path / "moe.gguf", weights, extra_tensors=extra))


@pytest.mark.parametrize("keep", [0.5, 0.01])
def test_truncated_file(tmp_path, weights, keep):
    full = write_tiny(tmp_path / "m.gguf", weights, T.Q4_0).read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(full[: int(len(full) * keep)])
    with pytest.raises(JmergeError, match="not a readable GGUF file"):
        read_gguf(cut)


def test_not_gguf_and_missing(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"PK\x03\x04" + bytes(1000))
    with pytest.raises(JmergeError, match="not a readable GGUF file"):
        read_gguf(junk)
    with pytest.raises(JmergeError, match="no such GGUF file"):
        read_gguf(tmp_path / "absent.gguf")


def test_shape_disagrees_with_metadata(tmp_path, weights):
    def lie(w):  # the file claims 8 heads, but q has rows for 4 heads of 16
        w.add_key_length(32)

    with pytest.raises(JmergeError, match="disagree with its metadata"):
        read_gguf(write_tiny(tmp_path / "lie.gguf", weights, extra_kv=[lie]))


# --- oracle: real SmolLM2 weights against transformers' own GGUF loader --------------------------


def _smollm2_path() -> Path | None:
    from jmerge.default_model import GGUF_IN_WHEEL, cache_root
    env = os.environ.get("JMERGE_SMOLLM2_GGUF")
    cached = cache_root() / "gguf" / Path(GGUF_IN_WHEEL).name  # fetched by `jmerge default-model`
    for p in ([Path(env)] if env else []) + [cached]:
        if p.is_file():
            return p
    return None


@pytest.mark.slow
def test_smollm2_matches_transformers_gguf_loader(tmp_path):
    path = _smollm2_path()
    if path is None:
        pytest.skip("SmolLM2 GGUF not found (set JMERGE_SMOLLM2_GGUF)")
    torch = pytest.importorskip("torch")
    import accelerate  # noqa: F401  (a test extra: transformers needs it for gguf_file=)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    state = ref.state_dict()
    m = read_gguf(path)

    names = set(m.tensor_names())
    assert names == set(state) - {"lm_head.weight"}  # tied: transformers materialises lm_head
    assert m.config["tie_word_embeddings"] is True
    for name in sorted(names):
        got, want = m.tensor(name), state[name].numpy()
        assert got.shape == want.shape, name
        assert np.abs(got.astype(np.float32) - want).max() <= 1e-6, name

    rc = ref.config
    c = m.config
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "bos_token_id", "eos_token_id",
                "pad_token_id", "tie_word_embeddings"):
        assert c[key] == getattr(rc, key), key
    assert math.isclose(c["rms_norm_eps"], rc.rms_norm_eps, rel_tol=1e-6)
    assert math.isclose(c["rope_theta"], rc.rope_parameters["rope_theta"], rel_tol=1e-6)
    assert rc.rope_parameters.get("rope_type", "default") == "default" and "rope_scaling" not in c

    m.save_tokenizer(tmp_path / "tok")
    mine = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    theirs = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    chats = [
        [{"role": "user", "content": "How do I bake sourdough bread at home?"}],
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2? Ünïcödé 🍞\n\ttabs"},
         {"role": "assistant", "content": "4."}, {"role": "user", "content": "Why?"}],
    ]
    for chat in chats:
        a = mine.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        b = theirs.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        assert a == b
        assert mine(a)["input_ids"] == theirs(b)["input_ids"]
    for attr in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(mine, attr) == getattr(theirs, attr), attr


# --- `jmerge convert` on GGUF: to HF (transformers loads it, same logits) and to orbax ------------


def test_convert_gguf_to_hf_and_orbax(tmp_path, weights, capsys):
    import jax
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jmerge.cli import main
    from jmerge.io import load_model
    from jmerge.models import llama

    src = write_tiny(tmp_path / "m.gguf", weights, T.Q8_0)
    assert main(["convert", str(src), str(tmp_path / "hf"), "-q"]) == 0
    assert "converted" in capsys.readouterr().out
    assert main(["convert", str(src), str(tmp_path / "ob"), "--to", "orbax", "-q"]) == 0
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = tok.apply_chat_template([{"role": "user", "content": "abc"}], tokenize=False, add_generation_prompt=True)
    ids = np.array([tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        want = ref(torch.tensor(ids)).logits.numpy()
    for d in ("hf", "ob"):
        m = load_model(tmp_path / d)
        got = np.asarray(jax.jit(lambda p, i: llama.forward(p, m.cfg, i))(m.params, ids))
        # Unit-variance random weights give logits of size ~20: compare relative to that scale.
        np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max(), err_msg=d)


def test_convert_unsupported_quant_type_exits_2(tmp_path, weights, capsys):
    from jmerge.cli import main
    block, nbytes = gguf.GGML_QUANT_SIZES[T.Q8_1]
    raw = np.zeros((1, HEADS * HEAD_DIM // block * nbytes), dtype=np.uint8)
    path = write_tiny(tmp_path / "q.gguf", weights, extra_tensors=[("blk.0.attn_q.bias", raw, T.Q8_1)])
    assert main(["convert", str(path), str(tmp_path / "out"), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Q8_1" in err and not (tmp_path / "out").exists()
