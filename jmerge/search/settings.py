"""The search config as typed values: one frozen dataclass per YAML section.

Each section's fields are its YAML keys, in the order that error messages list them, and their
defaults are the values a key left out of the YAML takes (`config.parse` fills and checks them).
Values that `parse` does not convert (lists, names, grids) are kept as the YAML wrote them, so the
report records a run's settings exactly as before the config was typed.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

# Fixed merges a config may list (settings in run.py's BASELINE_SETTINGS); a search runs
# DEFAULT_BASELINES when it lists none.
BASELINES = ("task_arithmetic", "ties", "mergealign", "resta", "safe_lora", "safemerge")
DEFAULT_BASELINES = ("task_arithmetic", "ties", "mergealign")
# Baselines whose method gives the experts roles, models = [domain fine-tune, safety-aligned
# model]: the experts named by searches.sweep's `domain` / `align` (their defaults without a sweep).
ROLE_BASELINES = ("resta", "safe_lora", "safemerge")


class Section:
    """A config section: a frozen dataclass whose every field has a default."""

    @classmethod
    def defaults(cls) -> dict:
        return dataclasses.asdict(cls())

    def to_json(self) -> dict:
        """The section as the report records it: every key in field order, values as parsed."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class CoefficientSearch(Section):
    granularity: str = "layer"  # or "layer_module": one λ per module type as well
    transform: str = "clamp"
    init: float = 0.5
    steps: int = 40
    lr: float = 0.05
    batch_size: int = 4
    clamp: list[float] = dataclasses.field(default_factory=lambda: [0.0, 1.0])
    warmup: int = 0
    prefer: str | None = None  # a preference data type whose DPO term joins the CE objective
    beta: float = 0.1
    reference: str = "base"  # the DPO reference: "base" or an expert's name


@dataclasses.dataclass(frozen=True)
class MaskSearch(Section):
    safe: str | None = None  # the expert the masked task vectors are added to (default: the first)
    granularity: str = "row"
    steps: int = 40
    lr: float = 0.05
    batch_size: int = 4
    temperature: float = 0.5
    init: float = 0.0
    sparsity: float = 0.0
    shared: bool = True
    lam: float = 1.0
    export: str = "soft"
    data: str | None = None  # the one data type to learn on (default: every CE type)
    warmup: int = 0
    objective: str = "ce"  # or "dpo" on `data`'s preference triples
    beta: float = 0.1
    reference: str = "base"
    prefer: str | None = None


@dataclasses.dataclass(frozen=True)
class EvolveSearch(Section):
    method: str = "ties"
    params: list[str] = dataclasses.field(default_factory=lambda: ["weight", "density"])
    global_params: list[str] = dataclasses.field(default_factory=list)
    init: dict[str, float] = dataclasses.field(default_factory=dict)
    generations: int = 6
    popsize: int = 8
    sigma0: float = 1 / 6
    batches: int = 2
    batch_size: int = 4


@dataclasses.dataclass(frozen=True)
class CocktailSearch(Section):
    temperature: float = 1.0
    batches: int = 2
    batch_size: int = 4


@dataclasses.dataclass(frozen=True)
class SweepSearch(Section):
    alpha: list[float] = dataclasses.field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0])
    beta: list[float] = dataclasses.field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0])
    domain: str = "domain"
    align: str = "safety"


Search = CoefficientSearch | MaskSearch | EvolveSearch | CocktailSearch | SweepSearch

# The `searches:` keys, each with the settings of its kind.
SEARCHES: dict[str, type[Search]] = {"coefficients": CoefficientSearch, "masks": MaskSearch,
                                     "evolve": EvolveSearch, "cocktail": CocktailSearch, "sweep": SweepSearch}


@dataclasses.dataclass(frozen=True)
class EvalSettings(Section):
    suites: list[str] = dataclasses.field(default_factory=lambda: ["safety", "overrefusal", "domain"])
    limit: int = 64
    max_new_tokens: int = 48
    batch_size: int = 16
    harmful: str = "harmbench"  # a built-in harmful source or a prompt file
    benign: Path | str | None = None  # a prompt file or "builtin"
    domain: Path | None = None
    data: Path | None = None


@dataclasses.dataclass(frozen=True)
class DataSpec:
    path: Path
    weight: float = 1.0
    # Glob on each row's "source" field (e.g. "benign:*"): one file split into types that are
    # weighted apart, such as refusals and the compliant answers that guard against over-refusal.
    source: str | None = None
    # Loss on the first N answer tokens only: where a chat model decides to refuse or to answer,
    # so that decision is weighted by itself instead of drowned in the answer's content tokens.
    tokens: int | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class SearchConfig:
    """The whole config. `searches` maps each configured kind to its settings in the YAML's
    order (a mapping, not a field per kind, because the report lists them in that order)."""
    base: Path
    experts: dict[str, Path]
    data: dict[str, DataSpec]
    searches: dict[str, Search]
    baselines: list[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_BASELINES))
    eval: EvalSettings = dataclasses.field(default_factory=EvalSettings)
    out: Path
    max_len: int = 192
    seed: int = 0
    checkpoint_every: int = 10
    dtype: str = "float32"
    mesh: str | None = None
    source: Path | None = None  # the YAML file; not a key of it

    @property
    def preference_data(self) -> set[str]:
        """Data types of {prompt, chosen, rejected} rows: the one a dpo masks search reads and any
        search's `prefer` type (a DPO term added to its CE objective)."""
        return preference_types(self.searches)


def preference_types(searches: dict[str, Search]) -> set[str]:
    # Only names are collected: parse calls this before it has refused values of other kinds.
    gradient = [s for s in (searches.get("coefficients"), searches.get("masks")) if s is not None]
    out = {s.prefer for s in gradient if isinstance(s.prefer, str)}
    m = searches.get("masks")
    return out | ({m.data} if m and m.objective == "dpo" and isinstance(m.data, str) else set())
