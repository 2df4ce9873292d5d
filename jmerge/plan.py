"""mergekit YAML -> a validated merge plan, and the per-tensor jobs it implies.

Two stages. `load_plan` reads and checks the YAML on its own (keys, method, parameter names and
values, model counts, base model). `resolve` takes the models' configs and expands the plan into
one `Job` per output Hugging Face tensor, with every parameter evaluated the way mergekit does:

- precedence: slice source (= `models[i].parameters`) > slice > top-level `parameters`;
- a list of numbers is a gradient, interpolated linearly at t = i / (n - 1) over the n layers of
  the current output slice (t = 1 when n = 1); embeddings use the first slice's sources, the
  final norm and lm_head the last slice's, both at t = 0 (mergekit 0.1.5; its older planner
  used t = 1 for the final tensors);
- a list of `{filter, value}` picks the first entry whose filter is a substring of the tensor
  name (no filter or "*" matches all); when none matches, the next level down is asked;
- per-model parameters match filters against the *input* tensor name, global ones against the
  output name (as mergekit does).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from pathlib import Path

from jmerge.errors import JmergeError, collect
from jmerge.io import files
from jmerge.merge.registry import Method, get as get_method, known_params

TOP_KEYS = ("models", "slices", "merge_method", "base_model", "dtype", "out_dtype",
            "tokenizer_source", "tokenizer", "chat_template", "parameters", "modules", "name")
MODEL_KEYS = ("model", "parameters")
SLICE_KEYS = ("sources", "base_model", "residual_weight", "parameters")
SOURCE_KEYS = ("model", "layer_range", "parameters")
MODULE_KEYS = ("slices", "models", "parameters")
# mergekit names the one module of a decoder-only architecture (its JSON kind "module") so.
MODULE_NAMES = ("default",)
FILTER_KEYS = ("filter", "value")
TOKENIZER_KEYS = ("source", "tokens", "pad_to_multiple_of")
TOKEN_KEYS = ("source", "force")
DTYPES = ("float32", "bfloat16", "float16")
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16",
                 "float": "float32"}


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
        return getattr(self.method.fn, "static_params", frozenset())


# ---------------------------------------------------------------------------- reading

def _hint(name, choices) -> str:
    close = difflib.get_close_matches(str(name), list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _unknown(keys, allowed, where: str) -> list[str]:
    return [f"unknown key {k!r} in {where}{_hint(k, allowed)}" for k in keys if k not in allowed]


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _text_number(name: str, v: str, where: str) -> str | None:
    fixed = files.yaml_float(v)
    if fixed is None:
        return None
    return f"{where}: {name!r} is the string {v!r} (YAML reads {v} as text; write {fixed})"


def _check_setting(name: str, setting, where: str, problems: list[str]) -> None:
    """A parameter setting: scalar, gradient list, or list of {filter, value}."""
    def values(s):
        if isinstance(s, list) and s and all(isinstance(e, dict) for e in s):
            for e in s:
                problems.extend(_unknown(e, FILTER_KEYS, f"{where} {name!r} filter entry"))
                if "value" not in e:
                    problems.append(f"{where}: {name!r} filter entry {e} has no 'value'")
                else:
                    yield from values(e["value"])
        elif isinstance(s, dict):
            problems.extend(_unknown(s, FILTER_KEYS, f"{where} {name!r}"))
            if "value" in s:
                yield from values(s["value"])
        elif isinstance(s, list):
            if not s:
                problems.append(f"{where}: {name!r} is an empty list")
            for e in s:
                if isinstance(e, (list, dict)):
                    problems.append(f"{where}: {name!r} mixes lists and filters: {s}")
                else:
                    yield e
        else:
            yield s

    for v in values(setting):
        text = _text_number(name, v, where) if isinstance(v, str) and name != "mask" else None
        if text:
            problems.append(text)
        elif name == "density" and (not _is_num(v) or not 0 < v <= 1):
            problems.append(f"{where}: density must be in (0, 1], got {v!r}")
        elif name == "mask":
            if not isinstance(v, str):
                problems.append(f"{where}: mask must be a path to a safetensors file, got {v!r}")
        elif v is not None and not isinstance(v, (int, float, bool)):
            problems.append(f"{where}: parameter {name!r} must be a number or boolean, got {v!r}")


class _Reader:
    """The problems and warnings of one config, and how strict to be about parameter names."""

    def __init__(self, method: Method, lenient: bool):
        self.method, self.lenient = method, lenient
        self.problems: list[str] = []
        self.ignored: dict[str, list[str]] = {}  # parameter a method ignores -> where it is set
        self.unknown: dict[str, list[str]] = {}  # under --lenient: name no method knows -> where
        self.residual: list[str] = []  # slices setting residual_weight

    def params(self, params, where: str) -> dict:
        """The parameters the method takes. A name another mergekit method takes is ignored, as
        mergekit ignores it; a name no method takes is an error (a warning when lenient)."""
        if params is None:
            return {}
        if not isinstance(params, dict):
            self.problems.append(f"{where}: parameters must be a mapping, got {params!r}")
            return {}
        m = self.method
        allowed = tuple(m.model_params) + tuple(m.global_params)
        kept = {}
        for k, v in params.items():
            if k in allowed:
                _check_setting(k, v, where, self.problems)
                kept[k] = v
            elif k in known_params():
                self.ignored.setdefault(k, []).append(where)
            elif self.lenient:
                self.unknown.setdefault(str(k), []).append(where)
            else:
                self.problems.append(f"unknown parameter {k!r} in {where} parameters (merge_method "
                                     f"{m.name}){_hint(k, allowed + tuple(sorted(known_params())))}; "
                                     "--lenient ignores it")
        return kept

    def warnings(self) -> list[str]:
        name = self.method.name
        out = [f"parameter {k!r} is not used by merge_method {name}; ignored ({', '.join(w)})"
               for k, w in self.ignored.items()]
        out += [f"unknown parameter {k!r} ignored ({', '.join(w)}){_hint(k, sorted(known_params()))}"
                for k, w in self.unknown.items()]
        if self.residual:
            out.append(f"residual_weight is ignored, as mergekit 0.1.5 ignores it ({', '.join(self.residual)})")
        return out

    def model_ref(self, value, where: str) -> str | None:
        problems = self.problems
        if isinstance(value, dict):  # mergekit's expanded form {model: {path: ...}, lora: ...}
            problems.append(f"{where}: write the model as a path string (BASE or BASE+ADAPTER)")
            return None
        if not isinstance(value, str) or not value.strip():
            problems.append(f"{where}: model must be a path string, got {value!r}")
            return None
        if re.match(r"^[a-z]+://", value):
            problems.append(f"{where}: {value!r}: only local paths are supported (no hub or URLs)")
            return None
        return value.strip()

    def models(self, entries, where: str, base: str | None) -> list[Slice]:
        """The `models:` form: one slice over every layer, the base appended as mergekit does."""
        if not isinstance(entries, list):
            raise JmergeError(f"{where} must be a list")
        srcs = []
        for i, m in enumerate(entries):
            w = f"{where}[{i}]"
            m = {"model": m} if isinstance(m, str) else m
            if not isinstance(m, dict):
                self.problems.append(f"{w}: expected {{model: PATH, parameters: ...}}")
                continue
            self.problems.extend(_unknown(m, MODEL_KEYS, w))
            ref = self.model_ref(m.get("model"), w)
            p = self.params(m.get("parameters"), w)
            if ref:
                srcs.append(Source(ref, None, p))
        if base and base not in [s.model for s in srcs]:
            srcs.append(Source(base, None, {}))  # mergekit adds the base as one more source
        return [Slice(tuple(srcs), None, {})]

    def slices(self, entries, where: str) -> list[Slice]:
        if not isinstance(entries, list):
            raise JmergeError(f"{where} must be a list")
        problems, out = self.problems, []
        for i, s in enumerate(entries):
            ws = f"{where}[{i}]"
            if not isinstance(s, dict) or not isinstance(s.get("sources"), list) or not s["sources"]:
                problems.append(f"{ws}: expected {{sources: [...]}} with at least one source")
                continue
            problems.extend(_unknown(s, SLICE_KEYS, ws))
            self.residual_weight(s.get("residual_weight"), ws)
            sbase = self.model_ref(s["base_model"], f"{ws}.base_model") \
                if s.get("base_model") is not None else None
            sp = self.params(s.get("parameters"), ws)
            srcs = []
            for j, src in enumerate(s["sources"]):
                w = f"{ws}.sources[{j}]"
                if not isinstance(src, dict):
                    problems.append(f"{w}: expected {{model: PATH, layer_range: [START, END]}}")
                    continue
                problems.extend(_unknown(src, SOURCE_KEYS, w))
                ref = self.model_ref(src.get("model"), w)
                lr = src.get("layer_range")
                if not (isinstance(lr, list) and len(lr) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in lr)):
                    problems.append(f"{w}: layer_range must be [START, END] integers, got {lr!r}")
                    lr = None
                elif not 0 <= lr[0] < lr[1]:
                    problems.append(f"{w}: layer_range {lr} is empty or negative")
                    lr = None
                p = self.params(src.get("parameters"), w)
                if ref and lr:
                    srcs.append(Source(ref, (lr[0], lr[1]), p))
            lengths = {b - a for a, b in (x.layer_range for x in srcs)}
            if len(lengths) > 1:
                problems.append(f"{ws}: all sources must cover the same number of layers, got {sorted(lengths)}")
            out.append(Slice(tuple(srcs), sbase, sp))
        return out

    def residual_weight(self, v, where: str) -> None:
        """mergekit 0.1.5 reads a slice's residual_weight (a float) and never uses it."""
        if v is None:
            return
        text = _text_number("residual_weight", v, where) if isinstance(v, str) else None
        if text or not _is_num(v):
            self.problems.append(text or f"{where}: residual_weight must be a number, got {v!r}")
        else:
            self.residual.append(where)

    def tokens(self, tokens) -> dict[str, TokenSource]:
        if tokens is None:
            return {}
        if not isinstance(tokens, dict):
            self.problems.append(f"tokenizer.tokens must be a mapping {{TOKEN: {{source: ..., force: ...}}}}, got {tokens!r}")
            return {}
        return {str(t): ts for t, spec in tokens.items()
                if (ts := self.token(spec, f"tokenizer.tokens[{str(t)!r}]")) is not None}

    def token(self, spec, where: str) -> TokenSource | None:
        problems = self.problems
        if spec is None:
            spec = {}
        if not isinstance(spec, dict):
            problems.append(f"{where}: expected {{source: MODEL | {{kind: zero}} | {{kind: model_token, ...}}, force: BOOL}}")
            return None
        problems.extend(_unknown(spec, TOKEN_KEYS, where))
        force = spec.get("force", False)
        if not isinstance(force, bool):
            problems.append(f"{where}: force must be true or false, got {force!r}")
        src = spec.get("source")
        if src is None:
            return TokenSource(None, force=force is True)
        if isinstance(src, str):
            ref = self.model_ref(src, f"{where}.source")
            return TokenSource("model", ref, force=force is True) if ref else None
        if not isinstance(src, dict) or src.get("kind") not in ("zero", "model_token"):
            problems.append(f"{where}.source must be a model path, {{kind: zero}} or "
                            f"{{kind: model_token, model: PATH, token_id: N | token: TEXT}}, got {src!r}")
            return None
        if src["kind"] == "zero":
            problems.extend(_unknown(src, ("kind",), f"{where}.source"))
            return TokenSource("zero", force=force is True)
        problems.extend(_unknown(src, ("kind", "model", "token_id", "token"), f"{where}.source"))
        ref = self.model_ref(src.get("model"), f"{where}.source.model")
        tid, tok = src.get("token_id"), src.get("token")
        if (tid is None) == (tok is None):
            problems.append(f"{where}.source: give one of token_id or token")
        elif tid is not None and (not isinstance(tid, int) or isinstance(tid, bool) or tid < 0):
            problems.append(f"{where}.source: token_id must be a non-negative integer, got {tid!r}")
        elif tok is not None and not isinstance(tok, str):
            problems.append(f"{where}.source: token must be a string, got {tok!r}")
        return TokenSource("model_token", ref, tid, tok, force is True) if ref else None


def _dtype(value, key: str, problems: list[str]) -> str | None:
    if value is None:
        return None
    v = DTYPE_ALIASES.get(str(value), str(value))
    if v not in DTYPES:
        problems.append(f"{key} {value!r} is not one of {', '.join(DTYPES)}")
        return None
    return v


def read_yaml(path: str | Path) -> dict:
    data = files.read_yaml(path, "merge config")
    if not isinstance(data, dict):
        raise JmergeError(f"{path}: expected a YAML mapping (merge_method, models, ...)")
    return data


def _modules(data: dict, r: _Reader, base: str | None) -> tuple[list[Slice], dict, bool]:
    """mergekit's `modules: {NAME: {slices | models, parameters}}`. jmerge's architectures are
    single-module, which mergekit names `default`; its parameters rank between the slice's and
    the top level's."""
    mods = data["modules"]
    if not isinstance(mods, dict):
        raise JmergeError(f"modules must be a mapping {{default: {{slices: ...}}}}, got {mods!r}")
    bad = [k for k in mods if k not in MODULE_NAMES]
    for k in bad:
        r.problems.append(f"unknown module {k!r}{_hint(k, MODULE_NAMES)}: these architectures have "
                          "one module, 'default'")
    m = mods.get("default")
    if bad or m is None:
        if not bad:
            r.problems.append("modules: needs the module 'default'")
        return [], {}, False
    if not isinstance(m, dict):
        raise JmergeError(f"modules.default must be a mapping {{slices | models, parameters}}, got {m!r}")
    r.problems.extend(_unknown(m, MODULE_KEYS, "modules.default"))
    forms = [k for k in ("models", "slices") if m.get(k)]
    if len(forms) != 1:
        r.problems.append("modules.default: exactly one of 'models' or 'slices' must be given")
        return [], {}, False
    params = r.params(m.get("parameters"), "modules.default")
    if forms == ["models"]:
        return r.models(m["models"], "modules.default.models", base), params, True
    return r.slices(m["slices"], "modules.default.slices"), params, False


def parse_plan(data: dict, path: str = "<config>", *, lenient: bool = False) -> MergePlan:
    """Check a mergekit configuration mapping and normalise it into slices. `lenient`: a
    parameter name no merge method knows is a warning instead of an error."""
    problems = _unknown(data, TOP_KEYS, "the config")
    if "merge_method" not in data:
        collect(problems + ["merge_method is required"], path)
    method = get_method(str(data["merge_method"]))
    r = _Reader(method, lenient)
    r.problems = problems
    forms = [k for k in ("models", "slices", "modules") if data.get(k)]
    if len(forms) != 1:
        problems.append("exactly one of 'models', 'slices' or 'modules' must be given")
    base = None
    if data.get("base_model") is not None:
        base = r.model_ref(data["base_model"], "base_model")
    params = r.params(data.get("parameters"), "top-level")

    slices: list[Slice] = []
    module_params: dict = {}
    from_models = False
    if forms == ["models"]:
        slices, from_models = r.models(data["models"], "models", base), True
    elif forms == ["slices"]:
        slices = r.slices(data["slices"], "slices")
    elif forms == ["modules"]:
        slices, module_params, from_models = _modules(data, r, base)

    tok_source, pad, tokens = data.get("tokenizer_source"), None, {}
    if data.get("tokenizer") is not None:
        t = data["tokenizer"]
        if tok_source is not None:
            problems.append("give tokenizer_source or tokenizer, not both")
        if not isinstance(t, dict):
            problems.append("tokenizer must be a mapping {source: base|union|PATH}")
        else:
            problems.extend(_unknown(t, TOKENIZER_KEYS, "tokenizer"))
            tokens = r.tokens(t.get("tokens"))
            tok_source, pad = t.get("source", "union"), t.get("pad_to_multiple_of")  # mergekit's default
            if pad is not None and (not isinstance(pad, int) or isinstance(pad, bool) or pad <= 0):
                problems.append(f"tokenizer.pad_to_multiple_of must be a positive integer, got {pad!r}")
    if tok_source is not None and tok_source not in ("base", "union"):
        tok_source = r.model_ref(tok_source, "tokenizer_source")
    ct = data.get("chat_template")
    if ct is not None and not isinstance(ct, str):
        problems.append(f"chat_template must be a string, got {ct!r}")
    plan = MergePlan(path=str(path), method=method, base_model=base, slices=slices, params=params,
                     dtype=_dtype(data.get("dtype"), "dtype", problems),
                     out_dtype=_dtype(data.get("out_dtype"), "out_dtype", problems),
                     tokenizer_source=tok_source, pad_to_multiple_of=pad, chat_template=ct,
                     from_models=from_models, raw=data, module_params=module_params,
                     tokens=tokens, warnings=r.warnings())
    if not problems:
        _check_method(plan, problems)
    collect(problems, f"{path}")
    return plan


def load_plan(path: str | Path, *, lenient: bool = False) -> MergePlan:
    return parse_plan(read_yaml(path), str(path), lenient=lenient)


def _check_method(plan: MergePlan, problems: list[str]) -> None:
    m = plan.method
    if plan.tokenizer_source not in (None, "base", "union") and \
            plan.tokenizer_source not in plan.referenced():
        problems.append(f"tokenizer_source {plan.tokenizer_source!r} is not one of the merged models")
    if plan.tokenizer_source == "base" and not plan.base_model:
        problems.append("tokenizer_source: base needs a base_model")
    for tok, ts in plan.tokens.items():
        if ts.model is not None and ts.model not in plan.referenced():
            problems.append(f"tokenizer.tokens[{tok!r}]: source model {ts.model!r} is not one of the merged models")
    for i, s in enumerate(plan.slices):
        base = s.base_model or plan.base_model
        where = "" if plan.from_models else f"slices[{i}]: "
        if m.base == "required" and not base:
            problems.append(f"{where}merge_method {m.name} needs a base_model")
            continue
        uses_base = m.base != "none" and base is not None
        inputs = [src.model for src in s.sources if not (uses_base and src.model == base)]
        n = len(dict.fromkeys(inputs))
        total = n + (1 if uses_base else 0)
        if m.name in ("slerp", "nearswap", "arcee_fusion") and (n != 1 or not uses_base):
            problems.append(f"{where}{m.name} needs exactly two models (base_model and one other), got {total}")
        elif n < m.min_models or (m.max_models is not None and n > m.max_models):
            want = (f"exactly {m.min_models}" if m.max_models == m.min_models else
                    f"at least {m.min_models}" if m.max_models is None else
                    f"{m.min_models} to {m.max_models}")
            extra = " besides the base" if uses_base else ""
            problems.append(f"{where}{m.name} needs {want} model(s){extra}, got {n}")
        for name, default in m.global_params.items():
            if default is None and not _mentions(name, plan, s):
                problems.append(f"{where}{m.name} needs parameter {name!r}")
    if m.name == "passthrough":
        for i, s in enumerate(plan.slices):
            if len(s.sources) != 1:
                problems.append(f"slices[{i}]: passthrough takes exactly one source per slice, got {len(s.sources)}")
    for name in plan.static_params:
        for setting in _all_settings(plan, name):
            if isinstance(setting, list):
                problems.append(f"parameter {name!r} must be one scalar for the whole merge (it changes shapes)")
                break


def _mentions(name: str, plan: MergePlan, s: Slice) -> bool:
    return name in plan.params or name in plan.module_params or name in s.params or \
        any(name in src.params for src in s.sources)


def _all_settings(plan: MergePlan, name: str):
    for d in [plan.params, plan.module_params] + [s.params for s in plan.slices] + \
            [src.params for s in plan.slices for src in s.sources]:
        if name in d:
            yield d[name]


# ---------------------------------------------------------------------------- evaluating

_MISSING = object()


def evaluate(setting, tensor_name: str, t: float):
    """One setting at one tensor and layer position; None when no filter matches."""
    if isinstance(setting, (int, float, bool, str)) or setting is None:
        return setting
    if isinstance(setting, dict):
        setting = [setting]
    if all(_is_num(e) for e in setting):
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    if all(not isinstance(e, (dict, list)) for e in setting):
        return setting[int(t * (len(setting) - 1))]
    for cond in setting:
        f = cond.get("filter")
        if f is None or f == "*" or (tensor_name and str(f) in tensor_name):
            return evaluate(cond.get("value"), tensor_name, t)
    return None


def lookup(name: str, levels: list[dict], tensor_name: str, t: float):
    for d in levels:
        if name in d:
            v = evaluate(d[name], tensor_name, t)
            if v is not None:
                return v
    return _MISSING


# ---------------------------------------------------------------------------- resolving

@dataclasses.dataclass(frozen=True)
class Job:
    """One output HF tensor: which inputs feed the method, with which parameters."""
    out_name: str
    layer: int | None  # output layer index, None for embeddings / final norm / lm_head
    slice: int
    base: str | None  # model ref passed as `base` (None for base-less methods)
    models: tuple[str, ...]  # model refs passed as `models`, in order
    in_names: tuple[str, ...]  # input HF name for base (if any) then each model
    params: dict  # global: scalar; per-model: tuple, one per entry of `models`


@dataclasses.dataclass
class Resolved:
    jobs: list[Job]
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
    jobs: list[Job] = []
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
            if v is _MISSING:
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
                if v is _MISSING:
                    v = default
                if v is None:
                    missing[f"per-model parameter {name!r} is required for {ref}"] = None
                vals.append(v)
            params[name] = tuple(vals)
        in_names = tuple(in_name_of(r) for r in ([base] if uses_base else []) + models)
        return Job(out_name, layer, si, base if uses_base else None, tuple(models), in_names, params)

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


def _check_values(plan: MergePlan, jobs: list[Job]) -> None:
    problems = []
    for name in ("density",):
        if name in plan.method.model_params:
            for j in jobs:
                for v in j.params[name]:
                    if not (_is_num(v) and 0 < v <= 1):
                        problems.append(f"density must be in (0, 1], got {v!r} for {j.out_name}")
                        break
                if problems:
                    break
    for name in plan.static_params:
        vals = {repr(j.params.get(name)) for j in jobs}
        if len(vals) > 1:
            problems.append(f"parameter {name!r} must have one value for the whole merge, got {sorted(vals)}")
    for j in jobs:
        for name, v in j.params.items():
            vs = v if isinstance(v, tuple) else (v,)
            for x in vs:
                if _is_num(x) and not math.isfinite(x):
                    problems.append(f"parameter {name!r} is not finite for {j.out_name}")
    problems += _zero_weights(plan, jobs)
    collect(list(dict.fromkeys(problems)), plan.path)


# Methods whose normalized result divides by the plain sum of the weights, by the flag that
# normalizes. The GTA methods divide by 1 where their sum is 0 (as mergekit does), so there only
# weights that are all 0 (a merge that would return the base alone) are refused.
DIVIDES_BY_SUM = {"linear": "normalize", "multislerp": "normalize_weights"}


def _zero_weights(plan: MergePlan, jobs: list[Job]) -> list[str]:
    m = plan.method
    flag = DIVIDES_BY_SUM.get(m.name, "normalize")
    if "weight" not in m.model_params or flag not in m.global_params:
        return []
    bad = []
    for j in jobs:
        ws = j.params["weight"]
        if not j.params[flag] or not ws or not all(_is_num(w) for w in ws):
            continue
        if all(w == 0 for w in ws) or (m.name in DIVIDES_BY_SUM and sum(ws) == 0):
            bad.append(j)
    if not bad:
        return []
    j = bad[0]
    what = "are all 0" if all(w == 0 for w in j.params["weight"]) else "sum to 0"
    more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
    return [f"the merge weights {list(j.params['weight'])} {what} for {j.out_name}{more}, and "
            f"{flag}: true divides by their sum; give a nonzero weight or set {flag}: false"]
