"""The merge plan: a mergekit YAML read and normalised into slices of sources (`config.load_plan`
makes one), before any model is opened."""

from __future__ import annotations

import dataclasses

from jmerge.merge.registry import Method


@dataclasses.dataclass(frozen=True)
class Source:
    model: str
    layer_range: tuple[int, int] | None  # None: every layer of the model (the `models:` form)
    params: dict


@dataclasses.dataclass(frozen=True)
class Slice:
    sources: tuple[Source, ...]
    base_model: str | None
    params: dict


@dataclasses.dataclass(frozen=True)
class TokenSource:
    """Where `tokenizer.tokens[TOKEN]` takes its embedding row from (mergekit's
    TokenEmbeddingConfig): kind "model" (that model's row of the token), "zero", "model_token"
    (row `token_id`, or the row of `token`, of `model`'s own vocabulary), or None (no source:
    allowed only while every model has the token and `force` is off)."""
    kind: str | None
    model: str | None = None
    token_id: int | None = None
    token: str | None = None
    force: bool = False


@dataclasses.dataclass
class MergePlan:
    path: str
    method: Method
    base_model: str | None
    slices: list[Slice]
    params: dict
    dtype: str | None
    out_dtype: str | None
    tokenizer_source: str | None
    pad_to_multiple_of: int | None
    chat_template: str | None
    from_models: bool  # written with `models:` (one slice over all layers)
    raw: dict
    module_params: dict = dataclasses.field(default_factory=dict)  # `modules.default.parameters`
    tokens: dict[str, TokenSource] = dataclasses.field(default_factory=dict)
    warnings: list[str] = dataclasses.field(default_factory=list)

    def referenced(self) -> list[str]:
        """Every model the plan reads, base first, in order of appearance."""
        seen = [self.base_model] if self.base_model else []
        for s in self.slices:
            if s.base_model and s.base_model not in seen:
                seen.append(s.base_model)
            for src in s.sources:
                if src.model not in seen:
                    seen.append(src.model)
        return seen

    @property
    def static_params(self) -> frozenset:
        return self.method.static_params
