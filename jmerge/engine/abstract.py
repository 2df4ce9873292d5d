"""A merge plan made ready from each model's config.json alone, no weight file needed: tensor
names, shapes and dtypes come from the config's layout (`--dry-run`, and sizing a merge before
its weights are downloaded)."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from jmerge.config import ModelConfig, load_config
from jmerge.engine.config import load_plan
from jmerge.engine.inputs import FLOAT_KINDS, ModelInput, check_plan, open_model
from jmerge.engine.plan import MergePlan
from jmerge.engine.prepare import Prepared, np_dtype, prepare
from jmerge.io import hf
from jmerge.io.source import locate


class ConfigSource:
    """A TensorSource declaring what the config implies, holding no values. `reads_into`: its
    dtypes are the files' own (what a plain safetensors checkpoint declares)."""
    reads_into = True

    def __init__(self, cfg: ModelConfig):
        self.layout = hf.hf_layout(cfg)
        named = cfg.hf_config.get("torch_dtype") or cfg.hf_config.get("dtype")
        self._dtype = np_dtype(named if named in FLOAT_KINDS else "float32")

    def names(self) -> list[str]:
        return list(self.layout)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.layout[name]

    def dtype(self, name: str) -> np.dtype:
        return self._dtype

    def array(self, name: str):
        raise RuntimeError(f"{name}: a model opened from its config alone has no values")

    read_into = array


def open_config_only(ref: str, config_dir: Path) -> ModelInput:
    """A merge input from its config.json when its directory holds no safetensors (else its
    headers, as a merge opens it)."""
    path = Path(locate(ref, config_dir))
    if "+" in ref or not path.is_dir() or any(path.glob("*.safetensors")):
        return open_model(ref, config_dir)
    cfg = load_config(path)
    return ModelInput(ref, path, cfg, ConfigSource(cfg), functools.partial(hf.copy_tokenizer, path), path)


def abstract_prepared(config: str | Path | MergePlan, *, lenient: bool = False) -> Prepared:
    """The plan checked and prepared as a merge would, its models opened by `open_config_only`."""
    plan = config if isinstance(config, MergePlan) else load_plan(config, lenient=lenient)
    return prepare(check_plan(plan, opener=open_config_only))
