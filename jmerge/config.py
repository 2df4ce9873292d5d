"""Model configuration read from a Hugging Face `config.json` (transformers v4 and v5 forms)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np

from jmerge.errors import JmergeError, collect

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


# Upper bounds far above any model of these families: a number past them is a corrupt or hostile
# config, refused before it sizes a layout, a loop or an allocation.
MAX_WIDTH = 1 << 20
MAX_HEADS = 1 << 14
MAX_LAYERS = 1 << 12
MAX_VOCAB = 1 << 24
MAX_POSITIONS = (1 << 31) - 1
LAYER_TYPES = ("full_attention", "sliding_attention")


class _Fields:
    """Typed, range-checked reads of a config dict; every problem is kept, to be reported at once.

    JSON null counts as absent (HF writes `"head_dim": null`), so it gets the default."""

    def __init__(self, obj: dict, problems: list[str], prefix: str = ""):
        self.obj, self.problems, self.prefix = obj, problems, prefix

    def _get(self, key: str, default):
        v = self.obj.get(key)
        if v is None and default is ...:
            self.problems.append(f"missing required field {self.prefix}{key!r}")
        return default if v is None else v

    def _bad(self, key: str, want: str, v) -> None:
        self.problems.append(f"{self.prefix}{key} must be {want}, got {json.dumps(v)[:40]}")

    def integer(self, key: str, default=..., lo: int = 1, hi: int = MAX_WIDTH):
        v = self._get(key, default)
        if v is ... or v is None and default is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            self._bad(key, f"an integer in [{lo}, {hi}]", v)
            return None
        return v

    def number(self, key: str, default=...):
        """A finite number > 0."""
        v = self._get(key, default)
        if v is ...:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
            self._bad(key, "a finite number > 0", v)
            return None
        return float(v)

    def flag(self, key: str, default: bool = False) -> bool:
        v = self._get(key, default)
        if not isinstance(v, bool):
            self._bad(key, "true or false", v)
            return default
        return v

    def text(self, key: str, default: str | None = None):
        v = self._get(key, default)
        if v is not None and not isinstance(v, str):
            self._bad(key, "a string", v)
            return default
        return v

    def token_ids(self, key: str, vocab: int | None):
        """An id or a list of ids, each inside the vocabulary."""
        v = self.obj.get(key)
        if v is None or v == []:
            return None
        ids = v if isinstance(v, list) else [v]
        hi = (vocab or MAX_VOCAB) - 1
        if not ids or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i <= hi for i in ids):
            self._bad(key, f"a token id in [0, {hi}] or a list of them", v)
            return None
        return tuple(ids) if isinstance(v, list) else v


def _rope(cfg: dict, problems: list[str]) -> _Fields:
    """Merge v4 (`rope_theta`, `rope_scaling`) and v5 (`rope_parameters`) forms into one dict."""
    out: dict = {}
    if cfg.get("rope_theta") is not None:
        out["rope_theta"] = cfg["rope_theta"]
    named = []
    for key in ("rope_scaling", "rope_parameters"):
        if isinstance(cfg.get(key), dict):
            out.update(cfg[key])
            named.append(key)
        elif cfg.get(key) is not None:
            problems.append(f"{key} must be an object or null, got {json.dumps(cfg[key])[:40]}")
    if "type" in out and "rope_type" not in out:
        out["rope_type"] = out["type"]
    return _Fields(out, problems, f"{named[-1]}." if named else "")


def _layer_windows(cfg: _Fields, family: str, n: int) -> tuple[int, ...]:
    window = cfg.integer("sliding_window", 0, lo=0, hi=MAX_POSITIONS) or 0
    types = cfg.obj.get("layer_types")
    if types is not None:
        if not isinstance(types, list) or any(t not in LAYER_TYPES for t in types):
            cfg._bad("layer_types", f"a list of {' / '.join(LAYER_TYPES)}", types)
            return (0,) * n
        if len(types) != n:
            cfg.problems.append(f"layer_types has {len(types)} entries for {n} layers")
            return (0,) * n
        return tuple(window if t == "sliding_attention" else 0 for t in types)
    if family == "mistral":
        return (window,) * n
    if family in ("qwen2", "qwen3") and cfg.flag("use_sliding_window") and window:
        first = cfg.integer("max_window_layers", n, lo=0, hi=MAX_LAYERS)
        return tuple(window if first is None or i >= first else 0 for i in range(n))
    return (0,) * n


def _architecture(cfg: dict, problems: list[str]) -> str | None:
    archs, model_type = cfg.get("architectures") or [], cfg.get("model_type")
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        problems.append(f"architectures must be a list of names, got {json.dumps(archs)[:40]}")
        return None
    if model_type is not None and not isinstance(model_type, str):
        problems.append(f"model_type must be a string, got {json.dumps(model_type)[:40]}")
        return None
    arch = next((a for a in archs if a in ARCHITECTURES), None)
    if arch is None:
        # Some exports omit `architectures`; fall back on model_type.
        by_type = {v: k for k, v in ARCHITECTURES.items()}
        arch = by_type.get(model_type or "")
    if arch is None:
        got = ", ".join(archs) or model_type or "none given"
        problems.append(f"unsupported architecture {got}; supported: {', '.join(ARCHITECTURES)}")
    return arch


def from_hf_dict(cfg: dict, where: str = "config.json") -> ModelConfig:
    """A checked ModelConfig: every field's type and range is verified here, before any layout is
    built from it; all problems are one error naming `where` (the config file or model)."""
    if not isinstance(cfg, dict):
        raise JmergeError(f"{where}: a model config must be a JSON object, got {type(cfg).__name__}")
    problems: list[str] = []
    arch = _architecture(cfg, problems)
    collect(problems, where)
    family = ARCHITECTURES[arch]
    f, rope = _Fields(cfg, problems), _rope(cfg, problems)
    hidden = f.integer("hidden_size")
    heads = f.integer("num_attention_heads", hi=MAX_HEADS)
    n = f.integer("num_hidden_layers", hi=MAX_LAYERS)
    vocab = f.integer("vocab_size", hi=MAX_VOCAB)
    inter = f.integer("intermediate_size")
    kv = f.integer("num_key_value_heads", heads, hi=MAX_HEADS)
    head_dim = f.integer("head_dim", None, hi=MAX_WIDTH)
    if heads and kv and heads % kv:
        problems.append(f"num_key_value_heads {kv} does not divide num_attention_heads {heads}")
    if head_dim is None and hidden and heads:
        if hidden % heads:
            problems.append(f"hidden_size {hidden} is not divisible by num_attention_heads {heads} (and no head_dim)")
        head_dim = hidden // heads
    if head_dim and head_dim % 2:
        problems.append(f"head_dim {head_dim} is odd (RoPE rotates pairs)")
    rope_type = rope.text("rope_type", "default")
    if rope_type not in ROPE_TYPES:
        problems.append(f"unsupported rope type {rope_type!r}; supported: {', '.join(ROPE_TYPES)}")
    low, high = rope.number("low_freq_factor", 1.0), rope.number("high_freq_factor", 4.0)
    if rope_type == "llama3" and low is not None and low == high:
        problems.append(f"llama3 RoPE needs low_freq_factor != high_freq_factor, both are {low}")
    act = f.text("hidden_act", "silu")
    if act not in ("silu", "swish"):
        problems.append(f"unsupported hidden_act {act!r}; supported: silu")
    attn_bias = f.flag("attention_bias")
    kw = dict(
        rms_norm_eps=f.number("rms_norm_eps", 1e-6),
        rope_theta=(f if cfg.get("rope_theta") is not None else rope).number("rope_theta", 10000.0),
        rope_factor=rope.number("factor", 1.0),
        rope_original_max_position=rope.integer("original_max_position_embeddings", 8192, hi=MAX_POSITIONS),
        max_position_embeddings=f.integer("max_position_embeddings", 2048, hi=MAX_POSITIONS),
        tie_word_embeddings=f.flag("tie_word_embeddings"),
        mlp_bias=f.flag("mlp_bias") and family == "llama",
        bos_token_id=f.integer("bos_token_id", None, lo=0, hi=(vocab or MAX_VOCAB) - 1),
        eos_token_id=f.token_ids("eos_token_id", vocab),
        # Any int32: some configs write -1, and generation falls back when it is outside the vocabulary.
        pad_token_id=f.integer("pad_token_id", None, lo=-(1 << 31), hi=(1 << 31) - 1),
    )
    windows = _layer_windows(f, family, n) if n else ()
    collect(problems, where)
    return ModelConfig(
        family=family, vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_layers=n,
        num_heads=heads, num_kv_heads=kv, head_dim=head_dim, rope_type=rope_type,
        rope_low_freq_factor=low, rope_high_freq_factor=high,
        qkv_bias=True if family == "qwen2" else (attn_bias and family in ("llama", "qwen3")),
        o_bias=attn_bias and family in ("llama", "qwen3"),
        qk_norm=family == "qwen3", layer_windows=windows, hidden_act="silu",
        hf_config=dict(cfg), **kw,
    )


def load_config(path: str | Path) -> ModelConfig:
    """Read `config.json` from a model directory (or the file itself)."""
    p = Path(path)
    f = p / "config.json" if p.is_dir() else p
    if not f.exists():
        raise JmergeError(f"{f}: no config.json (is this a Hugging Face model directory?)")
    from jmerge.io.files import read_json  # here: importing jmerge.io imports this module
    return from_hf_dict(read_json(f, "config.json"), str(f))
