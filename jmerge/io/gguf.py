"""Read llama.cpp GGUF checkpoints of the Llama family as Hugging Face tensors, config and tokenizer.

A GGUF file names tensors `blk.{i}.attn_q.weight` etc., stores them quantized, and keeps the
config and tokenizer as metadata. `read_gguf` maps all of it back to the HF conventions the rest
of jmerge speaks: HF tensor names and layouts ([out, in]), an HF `config.json` dict, and HF
tokenizer files. Tensors are dequantized one at a time, on request, from the memory-mapped file.
"""

from __future__ import annotations

import json
import math
import re
from collections import OrderedDict
from pathlib import Path

import numpy as np

from jmerge.errors import JmergeError, first_line

# GGUF `general.architecture` -> HF architecture. Mistral files use "llama": llama.cpp runs them
# as plain Llama (no sliding window), so LlamaForCausalLM computes what the file describes.
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}

_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# Llama 3 RoPE scaling: llama.cpp stores per-frequency divisors as a tensor, not as metadata.
_ROPE_FREQS = "rope_freqs.weight"


def _gguf():
    try:
        import gguf
    except ImportError:  # pragma: no cover - gguf is a dependency
        raise JmergeError("reading GGUF files needs the `gguf` package: pip install gguf") from None
    return gguf


def supported_types() -> list[str]:
    """GGML tensor types this reader can turn into floats."""
    gguf = _gguf()
    T = gguf.GGMLQuantizationType
    # gguf keeps its dequantizer registry private; if it moves, assume the long-standing formats.
    traits = getattr(gguf.quants, "_type_traits", None)
    if traits is None:
        traits = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]
    names = {T.F32.name, T.F16.name, T.BF16.name} | {t.name for t in traits}
    return sorted(names, key=lambda n: T[n].value)


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    m = _LAYER_RE.fullmatch(gguf_name)
    if m and m.group(2) in _LAYER_TENSORS:
        return f"model.layers.{m.group(1)}.{_LAYER_TENSORS[m.group(2)]}.{m.group(3)}"
    return None


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k permutation (HF rotate-half layout <- interleaved RoPE pairs).

    llama.cpp writes w.reshape(n, 2, rows/n/2, ...).swapaxes(1, 2); this is its inverse.
    """
    rows = w.shape[0]
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _f32_value(v):
    # Metadata floats are float32; print them as the short decimal they came from (1e-05, not 9.99e-06).
    return float(str(np.float32(v))) if isinstance(v, float) else v


def llama3_rope_scaling(factors: np.ndarray, rope_theta: float, head_dim: int) -> dict:
    """Recover HF `rope_scaling` (llama3) from llama.cpp's `rope_freqs` divisors.

    The divisors depend on (low_freq_factor, high_freq_factor, original_max_position) only up to a
    common scale, so low_freq_factor is fixed at 1 and the other two fitted to the ramp; the result
    is verified by recomputing every divisor.
    """
    f = np.asarray(factors, dtype=np.float64)
    inv = 1.0 / rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if f.shape != inv.shape:
        raise JmergeError(f"GGUF: rope_freqs has {f.size} entries, expected head_dim/2 = {inv.size}")
    wavelen = 2 * math.pi / inv
    factor = float(f.max())
    ramp = (f > 1 + 1e-4) & (f < factor * (1 - 1e-4))
    lf, hf, old = 1.0, 4.0, 8192.0  # Llama 3.1's values; kept when the ramp cannot pin them down
    if ramp.sum() >= 2:
        # 1/f = (1 - s)/factor + s with s = old/(hf - lf) / wavelen - lf/(hf - lf): linear in 1/wavelen.
        smooth = (1 / f[ramp] - 1 / factor) / (1 - 1 / factor)
        a, b = np.polyfit(1 / wavelen[ramp], smooth, 1)
        b = -b
        if a > 0 and b > 0:
            hf = round(1 + 1 / b, 4)
            old = float(round(a * (hf - lf)))
    scaling = {
        "rope_type": "llama3",
        "factor": _f32_value(factor),
        "low_freq_factor": lf,
        "high_freq_factor": hf,
        "original_max_position_embeddings": int(old),
    }
    if not np.allclose(llama3_divisors(scaling, rope_theta, head_dim), f, rtol=1e-4, atol=0):
        raise JmergeError("GGUF: rope_freqs does not follow the Llama 3 RoPE scaling rule; cannot rebuild it")
    return scaling


def llama3_divisors(scaling: dict, rope_theta: float, head_dim: int) -> np.ndarray:
    """The per-frequency divisors llama.cpp's converter writes as `rope_freqs` for llama3 scaling."""
    inv = 1.0 / rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv
    factor, lf, hf = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    smooth = (old / wavelen - lf) / (hf - lf)
    ramp = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < old / hf, 1.0, np.where(wavelen > old / lf, factor, ramp))


class GGUFModel:
    """An opened GGUF checkpoint: HF config, HF tensor names, tensors dequantized on demand."""

    def __init__(self, path: Path, reader):
        self.path = path
        self._reader = reader
        try:
            self.metadata = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
        except Exception as e:  # gguf decodes lazily; a damaged value fails here with any type
            raise JmergeError(f"{path}: damaged GGUF metadata ({type(e).__name__}: {e})") from None
        self.arch = self.metadata.get("general.architecture")
        if self.arch not in ARCHITECTURES:
            raise JmergeError(
                f"{path}: unsupported GGUF architecture {self.arch!r}; supported: {', '.join(ARCHITECTURES)}"
            )
        self._check_types()
        self._tensors = self._map_tensors()
        try:
            self.config = self._build_config()
        except (TypeError, ValueError, OverflowError) as e:
            raise JmergeError(f"{path}: bad GGUF metadata value ({e})") from None
        from jmerge.config import from_hf_dict
        from_hf_dict(self.config, str(path))  # ranges checked before any shape is computed from them
        self._heads = self.config["num_attention_heads"]
        self._kv_heads = self.config["num_key_value_heads"]
        self._check_shapes()

    # --- tensors ---------------------------------------------------------------------------
    def _check_types(self) -> None:
        ok = set(supported_types())
        bad = sorted({t.tensor_type.name for t in self._reader.tensors} - ok)
        if bad:
            raise JmergeError(
                f"{self.path}: unsupported GGUF tensor type {', '.join(bad)}; supported: {', '.join(supported_types())}"
            )

    def _map_tensors(self) -> dict:
        out, unknown = {}, []
        for t in self._reader.tensors:
            if t.name == _ROPE_FREQS:
                continue
            hf = _hf_name(t.name)
            if hf is None:
                unknown.append(t.name)
            else:
                out[hf] = t
        if unknown:
            shown = ", ".join(unknown[:5]) + (f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else "")
            raise JmergeError(f"{self.path}: GGUF tensors with no Llama-family equivalent: {shown}")
        if "model.embed_tokens.weight" not in out:
            raise JmergeError(f"{self.path}: GGUF file has no token_embd.weight")
        return out

    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        """HF shape of a tensor, without reading it."""
        return tuple(int(d) for d in reversed(self._tensors[name].shape.tolist()))

    def tensor(self, name: str) -> np.ndarray:
        """One tensor in HF layout: float32 (quantized, F32), float16 (F16) or bfloat16 (BF16)."""
        if name not in self._tensors:
            raise JmergeError(f"{self.path}: no tensor {name!r} in GGUF file")
        w = self._read(self._tensors[name])
        if self.arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            w = unpermute_rows(w, self._heads if ".q_proj." in name else self._kv_heads)
        return w

    def _read(self, t) -> np.ndarray:
        gguf = _gguf()
        T = gguf.GGMLQuantizationType
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        try:
            if t.tensor_type == T.F32:
                w = np.asarray(t.data, dtype=np.float32)
            elif t.tensor_type == T.F16:
                w = np.asarray(t.data, dtype=np.float16)
            elif t.tensor_type == T.BF16:
                import ml_dtypes  # bf16 kept exactly rather than widened

                w = np.ascontiguousarray(t.data).view(ml_dtypes.bfloat16)
            else:
                w = gguf.quants.dequantize(t.data, t.tensor_type)
            return w.reshape(shape)
        except (ValueError, NotImplementedError, gguf.quants.QuantError) as e:
            raise JmergeError(f"{self.path}: cannot decode GGUF tensor {t.name} ({e})") from None

    def _check_shapes(self) -> None:
        c = self.config
        head_dim = c["head_dim"]
        want = {
            "model.embed_tokens.weight": (c["vocab_size"], c["hidden_size"]),
            "lm_head.weight": (c["vocab_size"], c["hidden_size"]),
        }
        for i in range(c["num_hidden_layers"]):
            p = f"model.layers.{i}."
            want[p + "self_attn.q_proj.weight"] = (self._heads * head_dim, c["hidden_size"])
            want[p + "self_attn.k_proj.weight"] = (self._kv_heads * head_dim, c["hidden_size"])
        problems = [
            f"{n} is {self.shape(n)}, config says {s}" for n, s in want.items() if n in self._tensors and self.shape(n) != s
        ]
        if head_dim % 2:
            problems.append(f"head_dim {head_dim} is odd")
        if problems:
            shown = "; ".join(problems[:4]) + (f" (and {len(problems) - 4} more)" if len(problems) > 4 else "")
            raise JmergeError(f"{self.path}: GGUF tensors disagree with its metadata: {shown}")

    # --- config ----------------------------------------------------------------------------
    def _meta(self, key: str, default=None, required: bool = False):
        full = f"{self.arch}.{key}"
        if full in self.metadata:
            return self.metadata[full]
        if required:
            raise JmergeError(f"{self.path}: GGUF metadata lacks {full}")
        return default

    def _build_config(self) -> dict:
        m = self.metadata
        hidden = int(self._meta("embedding_length", required=True))
        heads = int(self._meta("attention.head_count", required=True))
        kv_heads = self._meta("attention.head_count_kv", heads)
        if isinstance(kv_heads, list):  # per-layer counts: only uniform ones fit the model
            if len(set(kv_heads)) != 1:
                raise JmergeError(f"{self.path}: per-layer KV head counts {sorted(set(kv_heads))} are not supported")
            kv_heads = kv_heads[0]
        # llama.cpp writes key_length only when the HF config had head_dim; Llama's rope dimension
        # is the full head (Qwen's may not be, so it is not read there).
        rope_dim = self._meta("rope.dimension_count") if self.arch == "llama" else None
        head_dim = self._meta("attention.key_length") or rope_dim or (hidden // heads if heads > 0 else 0)
        # The embedding's row count is what the model uses (a vocabulary may be padded past the tokens).
        vocab = self.shape("model.embed_tokens.weight")[0]
        cfg = {
            "architectures": [ARCHITECTURES[self.arch]],
            "model_type": self.arch,
            "vocab_size": int(vocab),
            "hidden_size": hidden,
            "intermediate_size": int(self._meta("feed_forward_length", required=True)),
            "num_hidden_layers": int(self._meta("block_count", required=True)),
            "num_attention_heads": heads,
            "num_key_value_heads": int(kv_heads),
            "head_dim": int(head_dim),
            "hidden_act": "silu",
            "rms_norm_eps": _f32_value(float(self._meta("attention.layer_norm_rms_epsilon", 1e-6))),
            "rope_theta": _f32_value(float(self._meta("rope.freq_base", 10000.0))),
            "max_position_embeddings": int(self._meta("context_length", 2048)),
            "tie_word_embeddings": "lm_head.weight" not in self._tensors,
        }
        if self.arch == "llama":
            cfg["attention_bias"] = "model.layers.0.self_attn.q_proj.bias" in self._tensors
            cfg["mlp_bias"] = "model.layers.0.mlp.up_proj.bias" in self._tensors
        elif self.arch == "qwen3":
            cfg["attention_bias"] = "model.layers.0.self_attn.q_proj.bias" in self._tensors
        for hf_key, gguf_key in (("bos_token_id", "bos"), ("pad_token_id", "padding")):
            if (v := m.get(f"tokenizer.ggml.{gguf_key}_token_id")) is not None:
                cfg[hf_key] = int(v)
        # End of generation: eos, plus end-of-turn / end-of-message where the file names them.
        eos = [int(m[k]) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                   "tokenizer.ggml.eom_token_id") if m.get(k) is not None]
        eos = list(dict.fromkeys(eos))
        if eos:
            cfg["eos_token_id"] = eos[0] if len(eos) == 1 else eos
        if (scaling := self._rope_scaling(cfg)) is not None:
            cfg["rope_scaling"] = scaling
        return cfg

    def _rope_scaling(self, cfg: dict) -> dict | None:
        kind = self._meta("rope.scaling.type")
        factor = self._meta("rope.scaling.factor") or self._meta("rope.scale_linear")
        if kind is None and self._meta("rope.scale_linear"):
            kind = "linear"  # older files only wrote rope.scale_linear
        if kind not in (None, "none"):
            out = {"rope_type": kind, "factor": _f32_value(float(factor or 1.0))}
            if (orig := self._meta("rope.scaling.original_context_length")) is not None:
                out["original_max_position_embeddings"] = int(orig)
            return out
        rope_freqs = next((t for t in self._reader.tensors if t.name == _ROPE_FREQS), None)
        if rope_freqs is None:
            return None
        divisors = self._read(rope_freqs).astype(np.float64)
        if np.allclose(divisors, 1.0):
            return None
        return llama3_rope_scaling(divisors, cfg["rope_theta"], cfg["head_dim"])

    # --- tokenizer -------------------------------------------------------------------------
    def chat_template(self) -> str | None:
        t = self.metadata.get("tokenizer.chat_template")
        if t is not None:
            from jmerge.io.hf import check_chat_template
            if not isinstance(t, str):
                raise JmergeError(f"{self.path}: GGUF tokenizer.chat_template must be a string")
            check_chat_template(t, f"{self.path} (tokenizer.chat_template)")
        return t

    def build_tokenizer(self):
        """A transformers fast tokenizer built from the GGUF metadata (no torch needed)."""
        try:
            from transformers.integrations.gguf.gguf_tokenizer_mapping import (
                GGUF_TOKENIZER_MAPPING,
                convert_gguf_tokenizer,
            )
        except ImportError:  # transformers 4.x kept these in integrations.ggml
            from transformers.integrations.ggml import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer
        from transformers import PreTrainedTokenizerFast

        m = self.metadata
        if "tokenizer.ggml.tokens" not in m:
            raise JmergeError(f"{self.path}: GGUF file has no tokenizer (tokenizer.ggml.tokens missing)")
        # Same grouping as transformers' own GGUF tokenizer loading (get_gguf_tokenizer).
        tok_dict, tok_config = (
            {name: m[f"tokenizer.{key}"] for key, name in GGUF_TOKENIZER_MAPPING[group].items()
             if f"tokenizer.{key}" in m}
            for group in ("tokenizer", "tokenizer_config")
        )
        if tok_dict.get("tokenizer_type") == "llama":
            tok_config.setdefault("add_bos_token", True)  # llama.cpp adds BOS to sentencepiece vocabularies
        tokens = tok_dict["tokens"]
        for name, key in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"), ("pad_token", "padding")):
            token_id = m.get(f"tokenizer.ggml.{key}_token_id")
            tok_config[name] = tokens[token_id] if token_id is not None and token_id < len(tokens) else None
        try:
            backend, extra = convert_gguf_tokenizer(self.arch, tok_dict)
            tok_config.setdefault("model_max_length", self.config["max_position_embeddings"])
            return PreTrainedTokenizerFast(tokenizer_object=backend, **tok_config, **extra)
        except Exception as e:  # transformers and tokenizers raise many unrelated types here
            first = first_line(e)
            raise JmergeError(f"{self.path}: cannot build a tokenizer from the GGUF metadata ({first})") from None

    def save_tokenizer(self, out_dir: str | Path) -> None:
        """Write tokenizer.json, tokenizer_config.json (with chat_template) and special tokens."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        template = self.chat_template()
        self.build_tokenizer().save_pretrained(str(out))
        # transformers v5 puts the template in chat_template.jinja; older readers look in the config.
        cfg_file = out / "tokenizer_config.json"
        cfg = json.loads(cfg_file.read_text())
        if template and "chat_template" not in cfg:
            cfg["chat_template"] = template
            cfg_file.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")

    def close(self) -> None:
        """Drop the memory map (tensors already returned stay valid only if copied)."""
        self._tensors = {}
        self._reader = None

    def __enter__(self) -> GGUFModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class GGUFSource:
    """A GGUF model as a TensorSource: dequantized tensors, a few kept so per-shard callbacks
    don't dequantize twice."""

    reads_into = False  # every tensor is dequantized whole

    def __init__(self, model: GGUFModel, keep_bytes: int = 1 << 30):
        self.model, self.keep, self.cache = model, keep_bytes, OrderedDict()
        self._names = list(model.tensor_names())

    def names(self):
        return self._names

    def shape(self, name):
        return tuple(self.model.shape(name))

    def dtype(self, name):
        return self.array(name).dtype

    def array(self, name) -> np.ndarray:
        if name not in self.cache:
            self.cache[name] = self.model.tensor(name)
            while sum(a.nbytes for a in self.cache.values()) > self.keep and len(self.cache) > 1:
                self.cache.popitem(last=False)
        self.cache.move_to_end(name)
        return self.cache[name]


def read_gguf(path: str | Path) -> GGUFModel:
    """Open a GGUF checkpoint of the Llama family; bad or unsupported files raise JmergeError."""
    from jmerge.io.files import regular_file
    p = regular_file(path, "GGUF file")
    gguf = _gguf()
    try:
        reader = gguf.GGUFReader(str(p), "r")
    except Exception as e:  # any parse failure means a damaged or non-GGUF file
        why = " ".join(str(e).split())
        raise JmergeError(f"{p}: not a readable GGUF file, truncated or damaged ({type(e).__name__}: {why})") from None
    return GGUFModel(p, reader)
