"""PEFT LoRA adapters as dense deltas: W' = W + scale · B @ A for each targeted module.

An adapter is usable wherever a model is: `LoraSource` presents base + adapter as one tensor
source, computing each targeted delta lazily (one tensor at a time, on the host).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np

from jmerge.errors import JmergeError
from jmerge.io.safetensors_io import Checkpoint, PICKLE_SUFFIXES, pickle_message


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").exists()


class LoraAdapter:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        cfg_file = self.path / "adapter_config.json"
        if not cfg_file.exists():
            raise JmergeError(f"{self.path}: no adapter_config.json (not a PEFT adapter)")
        try:
            self.config = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise JmergeError(f"{cfg_file}: not valid JSON ({e.msg})") from None
        if self.config.get("peft_type", "LORA") != "LORA":
            raise JmergeError(f"{self.path}: peft_type {self.config['peft_type']!r} unsupported; only LORA")
        if self.config.get("use_dora"):
            raise JmergeError(f"{self.path}: DoRA adapters are not supported (use_dora=true)")
        weights = self.path / "adapter_model.safetensors"
        if not weights.exists():
            pickles = [p for p in self.path.iterdir() if p.suffix in PICKLE_SUFFIXES]
            raise JmergeError(pickle_message(pickles[0]) if pickles else f"{self.path}: no adapter_model.safetensors")
        self.ckpt = Checkpoint(weights)
        r = int(self.config.get("r", 8))
        if r <= 0:
            raise JmergeError(f"{self.path}: LoRA rank r={r} must be positive")
        alpha = float(self.config.get("lora_alpha", r))
        self.default_scale = alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r
        self.rank_pattern = self.config.get("rank_pattern") or {}
        self.alpha_pattern = self.config.get("alpha_pattern") or {}
        self.pairs: dict[str, tuple[str, str]] = {}
        problems = []
        for name in self.ckpt.names():
            m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_A(?:\.default)?\.weight", name)
            if m:
                b = name.replace(".lora_A", ".lora_B")
                if b not in self.ckpt.where:
                    problems.append(f"{name} has no matching lora_B")
                self.pairs[m.group(1) + ".weight"] = (name, b)
            elif ".lora_B" not in name:
                problems.append(f"unsupported adapter tensor {name} (only lora_A/lora_B are understood)")
        if problems:
            raise JmergeError(f"{self.path}: " + "; ".join(problems[:5]))
        if not self.pairs:
            raise JmergeError(f"{self.path}: adapter has no lora_A/lora_B tensors")

    def scale(self, target: str) -> float:
        module = target.removesuffix(".weight")
        r, alpha = float(self.config.get("r", 8)), float(self.config.get("lora_alpha", 8))
        for pat, v in self.rank_pattern.items():
            if re.search(pat, module):
                r = float(v)
        for pat, v in self.alpha_pattern.items():
            if re.search(pat, module):
                alpha = float(v)
        if not self.rank_pattern and not self.alpha_pattern:
            return self.default_scale
        return alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r

    def delta(self, target: str) -> np.ndarray:
        a_name, b_name = self.pairs[target]
        a = self.ckpt.array(a_name).astype(np.float32)
        b = self.ckpt.array(b_name).astype(np.float32)
        d = self.scale(target) * (b @ a)
        return d.T if self.config.get("fan_in_fan_out") else d


class LoraSource:
    """Base model tensors with the adapter's deltas added (in float32, cast back to base dtype)."""

    def __init__(self, base, adapter: LoraAdapter):
        self.base, self.adapter = base, adapter
        missing = [t for t in adapter.pairs if t not in set(base.names())]
        if missing:
            raise JmergeError(f"{adapter.path}: adapter targets tensors the base lacks: {', '.join(missing[:5])}")
        for t in adapter.pairs:
            a, b = (adapter.ckpt.shape(n) for n in adapter.pairs[t])
            want = tuple(base.shape(t))
            got = (b[0], a[1]) if not adapter.config.get("fan_in_fan_out") else (a[1], b[0])
            if got != want:
                raise JmergeError(f"{adapter.path}: delta for {t} would be {list(got)}, base has {list(want)}")

    def names(self):
        return self.base.names()

    def shape(self, name):
        return self.base.shape(name)

    def dtype(self, name):
        return self.base.dtype(name)

    def array(self, name):
        w = self.base.array(name)
        if name not in self.adapter.pairs:
            return w
        return (w.astype(np.float32) + self.adapter.delta(name)).astype(w.dtype)
