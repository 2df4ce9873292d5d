"""Model configuration read from a Hugging Face `config.json` (transformers v4 and v5 forms)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np

from jmerge.errors import JmergeError

# HF architecture name -> family. One model file serves all of them, driven by flags below.
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    # Per layer: 0 = full attention, w > 0 = sliding window of w tokens (Mistral, Qwen2/3 options).
    layer_windows: tuple[int, ...] = ()
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    hf_config: dict = dataclasses.field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def eos_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        return tuple(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)

    def inv_freq(self) -> np.ndarray:
        """RoPE inverse frequencies (float64 on host), with the scaling rule applied."""
        inv = 1.0 / (self.rope_theta ** (np.arange(0, self.head_dim, 2, dtype=np.float64) / self.head_dim))
        if self.rope_type == "linear":
            return inv / self.rope_factor
        if self.rope_type == "llama3":
            # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, a smooth ramp between.
            low_wl = self.rope_original_max_position / self.rope_low_freq_factor
            high_wl = self.rope_original_max_position / self.rope_high_freq_factor
            wl = 2 * math.pi / inv
            smooth = (self.rope_original_max_position / wl - self.rope_low_freq_factor) / (
                self.rope_high_freq_factor - self.rope_low_freq_factor
            )
            mid = (1 - smooth) * inv / self.rope_factor + smooth * inv
            return np.where(wl > low_wl, inv / self.rope_factor, np.where(wl < high_wl, inv, mid))
        return inv


def _rope(cfg: dict) -> dict:
    """Merge v4 (`rope_theta`, `rope_scaling`) and v5 (`rope_parameters`) forms into one dict."""
    out: dict = {}
    if cfg.get("rope_theta") is not None:
        out["rope_theta"] = cfg["rope_theta"]
    for key in ("rope_scaling", "rope_parameters"):
        if isinstance(cfg.get(key), dict):
            out.update(cfg[key])
    if "type" in out and "rope_type" not in out:
        out["rope_type"] = out["type"]
    return out


def _layer_windows(cfg: dict, family: str, n: int) -> tuple[int, ...]:
    window = cfg.get("sliding_window") or 0
    if cfg.get("layer_types"):
        types = cfg["layer_types"]
        if len(types) != n:
            raise JmergeError(f"config.json: layer_types has {len(types)} entries for {n} layers")
        return tuple(window if t == "sliding_attention" else 0 for t in types)
    if family == "mistral":
        return (window,) * n
    if family in ("qwen2", "qwen3") and cfg.get("use_sliding_window") and window:
        first = cfg.get("max_window_layers", n)
        return tuple(window if i >= first else 0 for i in range(n))
    return (0,) * n


def from_hf_dict(cfg: dict) -> ModelConfig:
    archs = cfg.get("architectures") or []
    arch = next((a for a in archs if a in ARCHITECTURES), None)
    if arch is None:
        # Some exports omit `architectures`; fall back on model_type.
        by_type = {v: k for k, v in ARCHITECTURES.items()}
        arch = by_type.get(cfg.get("model_type", ""))
    if arch is None:
        got = ", ".join(archs) or cfg.get("model_type") or "none given"
        raise JmergeError(
            f"unsupported architecture {got}; supported: {', '.join(ARCHITECTURES)}"
        )
    family = ARCHITECTURES[arch]
    try:
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        n = int(cfg["num_hidden_layers"])
        rope = _rope(cfg)
        rope_type = rope.get("rope_type", "default")
        if rope_type not in ROPE_TYPES:
            raise JmergeError(f"unsupported rope type {rope_type!r}; supported: {', '.join(ROPE_TYPES)}")
        eos = cfg.get("eos_token_id")
        if act := cfg.get("hidden_act", "silu"):
            if act not in ("silu", "swish"):
                raise JmergeError(f"unsupported hidden_act {act!r}; supported: silu")
        attn_bias = bool(cfg.get("attention_bias", False))
        return ModelConfig(
            family=family,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=n,
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta", 10000.0)),
            rope_type=rope_type,
            rope_factor=float(rope.get("factor", 1.0)),
            rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
            rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
            rope_original_max_position=int(rope.get("original_max_position_embeddings", 8192)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=True if family == "qwen2" else (attn_bias and family in ("llama", "qwen3")),
            o_bias=attn_bias and family in ("llama", "qwen3"),
            mlp_bias=bool(cfg.get("mlp_bias", False)) and family == "llama",
            qk_norm=family == "qwen3",
            layer_windows=_layer_windows(cfg, family, n),
            hidden_act="silu",
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            pad_token_id=cfg.get("pad_token_id"),
            hf_config=dict(cfg),
        )
    except KeyError as e:
        raise JmergeError(f"config.json: missing required field {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise JmergeError(f"config.json: bad value ({e})") from None


def load_config(path: str | Path) -> ModelConfig:
    """Read `config.json` from a model directory (or the file itself)."""
    p = Path(path)
    f = p / "config.json" if p.is_dir() else p
    if not f.exists():
        raise JmergeError(f"{f}: no config.json (is this a Hugging Face model directory?)")
    try:
        return from_hf_dict(json.loads(f.read_text()))
    except json.JSONDecodeError as e:
        raise JmergeError(f"{f}: not valid JSON ({e.msg}, line {e.lineno})") from None
