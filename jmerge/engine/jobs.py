"""A `MergePlan` expanded against the models' layer counts into one `TensorJob` per output
Hugging Face tensor, every parameter evaluated the way mergekit does (`settings.lookup`):

- precedence: slice source (= `models[i].parameters`) > slice > `modules.default.parameters` >
  top-level `parameters`;
- a list of numbers is a gradient, interpolated linearly at t = i / (n - 1) over the n layers of
  the current output slice (t = 1 when n = 1); embeddings use the first slice's sources, the
  final norm and lm_head the last slice's, both at t = 0 (mergekit 0.1.5; its older planner
  used t = 1 for the final tensors);
- a list of `{filter, value}` picks the first entry whose filter is a substring of the tensor
  name (no filter or "*" matches all); when none matches, the next level down is asked;
- per-model parameters match filters against the *input* tensor name, global ones against the
  output name (as mergekit does).

The values are then checked across all jobs (ranges, one value for static parameters, finite
numbers, weights that can be normalized).
"""

from __future__ import annotations

import dataclasses
import math

from jmerge.engine.plan import MergePlan
from jmerge.engine.settings import MISSING, is_num, lookup
from jmerge.errors import collect


class BaseFirst:
    """The inputs of a record with `base` (None: the method takes none) and `models`, in the
    order everything about them is listed: the base first when there is one."""

    @property
    def inputs(self) -> tuple[str, ...]:
        return ((self.base,) if self.base else ()) + tuple(self.models)

    def split(self, xs: list) -> tuple:
        """(base, models) of values listed in `inputs` order."""
        return (xs[0], xs[1:]) if self.base else (None, xs)


@dataclasses.dataclass(frozen=True)
class TensorJob(BaseFirst):
    """One output HF tensor: which inputs feed the method, with which parameters."""
    out_name: str
    layer: int | None  # output layer index, None for embeddings / final norm / lm_head
    slice: int
    base: str | None  # model ref passed as `base` (None for base-less methods)
    models: tuple[str, ...]  # model refs passed as `models`, in order
    in_names: tuple[str, ...]  # input HF name for each of `inputs`
    params: dict  # global: scalar; per-model: tuple, one per entry of `models`


@dataclasses.dataclass
class Resolved:
    jobs: list[TensorJob]
    num_layers: int  # output layer count
    slice_layers: list[tuple[int, int]]  # output [start, end) per slice


def _slice_ranges(plan: MergePlan, layers: dict[str, int], problems: list[str]) -> list[list[tuple[int, int]]]:
    out = []
    for i, s in enumerate(plan.slices):
        ranges = []
        for j, src in enumerate(s.sources):
            n = layers[src.model]
            lr = src.layer_range or (0, n)
            if lr[1] > n:
                problems.append(f"slices[{i}].sources[{j}]: layer_range {list(lr)} is out of bounds: "
                                f"{src.model} has {n} layers")
            ranges.append(lr)
        if plan.from_models and len({b - a for a, b in ranges}) > 1:
            counts = ", ".join(f"{src.model}: {layers[src.model]}" for src in s.sources)
            problems.append(f"models have different layer counts ({counts}); use slices with layer_range")
        out.append(ranges)
    return out


def resolve(plan: MergePlan, layers: dict[str, int], layer_tensors: list[str],
            pre_tensors: list[str], post_tensors: list[str]) -> Resolved:
    """Expand the plan into jobs. `layers`: layer count per model; `layer_tensors`: names of one
    layer's tensors relative to `model.layers.{i}.`; pre/post: embeddings / final norm + head."""
    problems: list[str] = []
    ranges = _slice_ranges(plan, layers, problems)
    collect(problems, plan.path)
    m = plan.method
    jobs: list[TensorJob] = []
    slice_layers = []
    missing: dict[str, None] = {}

    def make(out_name, layer, si, t, in_name_of):
        s = plan.slices[si]
        base = s.base_model or plan.base_model
        uses_base = m.base != "none" and base is not None
        models = list(dict.fromkeys(src.model for src in s.sources if not (uses_base and src.model == base)))
        src_of = {src.model: src for src in s.sources}
        params = {}
        for name, default in m.global_params.items():
            v = lookup(name, [s.params, plan.module_params, plan.params], out_name, t)
            if v is MISSING:
                v = default
            if v is None:
                missing[f"parameter {name!r} is required"] = None
            params[name] = v
        for name, default in m.model_params.items():
            vals = []
            for ref in models:
                in_name = in_name_of(ref)
                v = lookup(name, [src_of[ref].params if ref in src_of else {}, s.params,
                                  plan.module_params, plan.params], in_name, t)
                if v is MISSING:
                    v = default
                if v is None:
                    missing[f"per-model parameter {name!r} is required for {ref}"] = None
                vals.append(v)
            params[name] = tuple(vals)
        job = TensorJob(out_name, layer, si, base if uses_base else None, tuple(models), (), params)
        return dataclasses.replace(job, in_names=tuple(in_name_of(r) for r in job.inputs))

    for name in pre_tensors:
        jobs.append(make(name, None, 0, 0.0, lambda ref, n=name: n))
    out_layer = 0
    for si, s in enumerate(plan.slices):
        n = ranges[si][0][1] - ranges[si][0][0]
        start_of = {src.model: r[0] for src, r in zip(s.sources, ranges[si])}
        base = s.base_model or plan.base_model
        if base and base not in start_of:
            start_of[base] = ranges[si][0][0]  # a slice base outside the sources: same layer window
        slice_layers.append((out_layer, out_layer + n))
        for off in range(n):
            t = off / (n - 1) if n > 1 else 1.0
            for rel in layer_tensors:
                def in_name_of(ref, rel=rel, off=off):
                    return f"model.layers.{start_of[ref] + off}.{rel}"
                jobs.append(make(f"model.layers.{out_layer}.{rel}", out_layer, si, t, in_name_of))
            out_layer += 1
    last = len(plan.slices) - 1
    for name in post_tensors:
        jobs.append(make(name, None, last, 0.0, lambda ref, n=name: n))
    collect(list(missing), plan.path)
    _check_values(plan, jobs)
    return Resolved(jobs, out_layer, slice_layers)


def _values(v) -> tuple:
    return v if isinstance(v, tuple) else (v,)


def _check_values(plan: MergePlan, jobs: list[TensorJob]) -> None:
    problems = []
    for name, spec in plan.method.params.items():
        if spec.range is None:
            continue
        bad = next(((v, j) for j in jobs for v in _values(j.params[name])
                    if not (is_num(v) and v in spec.range)), None)
        if bad:
            problems.append(f"{name} must be in {spec.range}, got {bad[0]!r} for {bad[1].out_name}")
    for name in plan.static_params:
        vals = {repr(j.params.get(name)) for j in jobs}
        if len(vals) > 1:
            problems.append(f"parameter {name!r} must have one value for the whole merge, got {sorted(vals)}")
    for j in jobs:
        for name, v in j.params.items():
            for x in _values(v):
                if is_num(x) and not math.isfinite(x):
                    problems.append(f"parameter {name!r} is not finite for {j.out_name}")
    problems += _zero_weights(plan, jobs)
    collect(list(dict.fromkeys(problems)), plan.path)


def _zero_weights(plan: MergePlan, jobs: list[TensorJob]) -> list[str]:
    # Methods that divide by the plain sum refuse weights summing to 0; the GTA methods divide by
    # 1 there (as mergekit does), so only weights that are all 0 (the base alone) are refused.
    m = plan.method
    flag = m.normalize_flag
    if "weight" not in m.model_params or flag is None:
        return []
    bad = []
    for j in jobs:
        ws = j.params["weight"]
        if not j.params[flag] or not ws or not all(is_num(w) for w in ws):
            continue
        if all(w == 0 for w in ws) or (m.divides_by_sum and sum(ws) == 0):
            bad.append(j)
    if not bad:
        return []
    j = bad[0]
    what = "are all 0" if all(w == 0 for w in j.params["weight"]) else "sum to 0"
    more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
    return [f"the merge weights {list(j.params['weight'])} {what} for {j.out_name}{more}, and "
            f"{flag}: true divides by their sum; give a nonzero weight or set {flag}: false"]
