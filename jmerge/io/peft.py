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

from jmerge.errors import JmergeError, collect
from jmerge.io.files import field, read_json
from jmerge.io.safetensors_io import Checkpoint, PICKLE_SUFFIXES, pickle_message


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").exists()


def read_adapter_config(path: str | Path) -> dict:
    """adapter_config.json of an adapter dir, every field jmerge uses checked for type and range."""
    f = Path(path) / "adapter_config.json"
    if not f.exists():
        raise JmergeError(f"{path}: no adapter_config.json (not a PEFT adapter)")
    c = read_json(f, "adapter_config.json")
    what = "adapter_config.json"
    if field(c, "peft_type", (str, type(None)), f, what, "LORA") not in ("LORA", None):
        raise JmergeError(f"{f}: peft_type {c['peft_type']!r} unsupported; only LORA")
    for key in ("use_dora", "use_rslora", "fan_in_fan_out"):
        field(c, key, (bool, type(None)), f, what, None)
    if c.get("use_dora"):
        raise JmergeError(f"{f}: DoRA adapters are not supported (use_dora=true)")
    field(c, "base_model_name_or_path", (str, type(None)), f, what, None)
    _positive(f, "r", field(c, "r", int, f, what, 8), int)
    _positive(f, "lora_alpha", field(c, "lora_alpha", (int, float), f, what, c.get("r", 8)), (int, float))
    for key, kind in (("rank_pattern", int), ("alpha_pattern", (int, float))):
        pats = field(c, key, (dict, type(None)), f, what, None) or {}
        for pat, v in pats.items():
            try:
                re.compile(pat)
            except re.error as e:
                raise JmergeError(f"{f}: {key} key {pat!r} is not a valid regular expression ({e})") from None
            _positive(f, f"{key}[{pat!r}]", v, kind)
    return c


def _positive(f: Path, key: str, v, kind) -> None:
    if isinstance(v, bool) or not isinstance(v, kind) or not (math.isfinite(v) and v > 0):
        want = "a positive integer" if kind is int else "a finite number > 0"
        raise JmergeError(f"{f}: {key} must be {want}, got {json.dumps(v)[:40]}")


class LoraAdapter:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config = read_adapter_config(self.path)
        weights = self.path / "adapter_model.safetensors"
        if not weights.exists():
            pickles = [p for p in self.path.iterdir() if p.suffix in PICKLE_SUFFIXES]
            raise JmergeError(pickle_message(pickles[0]) if pickles else f"{self.path}: no adapter_model.safetensors")
        self.ckpt = Checkpoint(weights)
        r = self.config.get("r", 8)
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
                else:
                    problems += self._check_pair(m.group(1), name, b)
                self.pairs[m.group(1) + ".weight"] = (name, b)
            elif ".lora_B" in name:
                if name.replace(".lora_B", ".lora_A") not in self.ckpt.where:
                    problems.append(f"{name} has no matching lora_A")
            else:
                problems.append(f"unsupported adapter tensor {name} (only lora_A/lora_B are understood)")
        collect(problems, str(self.path))
        if not self.pairs:
            raise JmergeError(f"{self.path}: adapter has no lora_A/lora_B tensors")

    def _check_pair(self, module: str, a_name: str, b_name: str) -> list[str]:
        """lora_A [r, in] and lora_B [out, r] of one module: 2-D floats whose ranks agree with
        each other and with the config (whose r sets the scale alpha / r)."""
        a, b = self.ckpt.shape(a_name), self.ckpt.shape(b_name)
        if len(a) != 2 or len(b) != 2:
            return [f"{module}: lora_A {list(a)} and lora_B {list(b)} must both be matrices"]
        kinds = {self.ckpt.dtype(a_name).kind, self.ckpt.dtype(b_name).kind}
        if not kinds <= {"f", "V"}:  # "V": ml_dtypes' bfloat16 / float8 report as void
            return [f"{module}: lora tensors must be floats"]
        if a[0] != b[1]:
            return [f"{module}: lora_A has rank {a[0]} but lora_B has rank {b[1]}"]
        r = self._rank(module)
        if a[0] != r:
            return [f"{module}: lora tensors have rank {a[0]}, adapter_config.json says r={r}"]
        return []

    def _rank(self, module: str) -> int:
        r = self.config.get("r", 8)
        for pat, v in self.rank_pattern.items():
            if re.search(pat, module):
                r = v
        return r

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

    reads_into = False  # a targeted tensor is base + delta, computed whole

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
