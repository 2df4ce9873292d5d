"""mergekit YAML -> a checked `MergePlan`, on its own (no model opened): keys, method, parameter
names and values, model counts, base model. `jobs.resolve` later expands it per tensor."""

from __future__ import annotations

from pathlib import Path

from jmerge.engine.plan import MergePlan, Slice
from jmerge.engine.reader import Reader, hint, unknown_keys
from jmerge.errors import JmergeError, collect
from jmerge.io import files
from jmerge.merge.registry import get as get_method

TOP_KEYS = ("models", "slices", "merge_method", "base_model", "dtype", "out_dtype",
            "tokenizer_source", "tokenizer", "chat_template", "parameters", "modules", "name")
MODULE_KEYS = ("slices", "models", "parameters")
# mergekit names the one module of a decoder-only architecture (its JSON kind "module") so.
MODULE_NAMES = ("default",)
TOKENIZER_KEYS = ("source", "tokens", "pad_to_multiple_of")
DTYPES = ("float32", "bfloat16", "float16")
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16",
                 "float": "float32"}


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


def _modules(data: dict, r: Reader, base: str | None) -> tuple[list[Slice], dict, bool]:
    """mergekit's `modules: {NAME: {slices | models, parameters}}`. jmerge's architectures are
    single-module, which mergekit names `default`; its parameters rank between the slice's and
    the top level's."""
    mods = data["modules"]
    if not isinstance(mods, dict):
        raise JmergeError(f"modules must be a mapping {{default: {{slices: ...}}}}, got {mods!r}")
    bad = [k for k in mods if k not in MODULE_NAMES]
    for k in bad:
        r.problems.append(f"unknown module {k!r}{hint(k, MODULE_NAMES)}: these architectures have "
                          "one module, 'default'")
    m = mods.get("default")
    if bad or m is None:
        if not bad:
            r.problems.append("modules: needs the module 'default'")
        return [], {}, False
    if not isinstance(m, dict):
        raise JmergeError(f"modules.default must be a mapping {{slices | models, parameters}}, got {m!r}")
    r.problems.extend(unknown_keys(m, MODULE_KEYS, "modules.default"))
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
    problems = unknown_keys(data, TOP_KEYS, "the config")
    if "merge_method" not in data:
        collect(problems + ["merge_method is required"], path)
    method = get_method(str(data["merge_method"]))
    r = Reader(method, lenient)
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
            problems.extend(unknown_keys(t, TOKENIZER_KEYS, "tokenizer"))
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
        if m.pair and (n != 1 or not uses_base):
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
    if m.single_source:
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
