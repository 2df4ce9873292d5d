"""The sections of one mergekit YAML read into plan types, every problem collected: model
references, `models:` and `slices:` lists, parameter settings (names against the method,
values against their ranges), tokenizer tokens."""

from __future__ import annotations

import difflib
import re

from jmerge.errors import JmergeError
from jmerge.io import files
from jmerge.merge import registry
from jmerge.merge.registry import Method, known_params
from jmerge.engine.plan import Slice, Source, TokenSource
from jmerge.engine.settings import is_num

MODEL_KEYS = ("model", "parameters")
SLICE_KEYS = ("sources", "base_model", "residual_weight", "parameters")
SOURCE_KEYS = ("model", "layer_range", "parameters")
FILTER_KEYS = ("filter", "value")
TOKEN_KEYS = ("source", "force")


def hint(name, choices) -> str:
    close = difflib.get_close_matches(str(name), list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def unknown_keys(keys, allowed, where: str) -> list[str]:
    return [f"unknown key {k!r} in {where}{hint(k, allowed)}" for k in keys if k not in allowed]


def text_number(name: str, v: str, where: str) -> str | None:
    fixed = files.yaml_float(v)
    if fixed is None:
        return None
    return f"{where}: {name!r} is the string {v!r} (YAML reads {v} as text; write {fixed})"


def _check_setting(name: str, setting, where: str, problems: list[str]) -> None:
    """A parameter setting: scalar, gradient list, or list of {filter, value}."""
    def values(s):
        if isinstance(s, list) and s and all(isinstance(e, dict) for e in s):
            for e in s:
                problems.extend(unknown_keys(e, FILTER_KEYS, f"{where} {name!r} filter entry"))
                if "value" not in e:
                    problems.append(f"{where}: {name!r} filter entry {e} has no 'value'")
                else:
                    yield from values(e["value"])
        elif isinstance(s, dict):
            problems.extend(unknown_keys(s, FILTER_KEYS, f"{where} {name!r}"))
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

    spec = registry.param_spec(name)
    for v in values(setting):
        text = text_number(name, v, where) if isinstance(v, str) and not (spec and spec.path) else None
        if text:
            problems.append(text)
        elif spec and spec.range and (not is_num(v) or v not in spec.range):
            problems.append(f"{where}: {name} must be in {spec.range}, got {v!r}")
        elif spec and spec.path:
            if not isinstance(v, str):
                problems.append(f"{where}: {name} must be a path to a safetensors file, got {v!r}")
        elif v is not None and not isinstance(v, (int, float, bool)):
            problems.append(f"{where}: parameter {name!r} must be a number or boolean, got {v!r}")


class Reader:
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
                                     f"{m.name}){hint(k, allowed + tuple(sorted(known_params())))}; "
                                     "--lenient ignores it")
        return kept

    def warnings(self) -> list[str]:
        name = self.method.name
        out = [f"parameter {k!r} is not used by merge_method {name}; ignored ({', '.join(w)})"
               for k, w in self.ignored.items()]
        out += [f"unknown parameter {k!r} ignored ({', '.join(w)}){hint(k, sorted(known_params()))}"
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
            self.problems.extend(unknown_keys(m, MODEL_KEYS, w))
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
            problems.extend(unknown_keys(s, SLICE_KEYS, ws))
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
                problems.extend(unknown_keys(src, SOURCE_KEYS, w))
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
        text = text_number("residual_weight", v, where) if isinstance(v, str) else None
        if text or not is_num(v):
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
        problems.extend(unknown_keys(spec, TOKEN_KEYS, where))
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
            problems.extend(unknown_keys(src, ("kind",), f"{where}.source"))
            return TokenSource("zero", force=force is True)
        problems.extend(unknown_keys(src, ("kind", "model", "token_id", "token"), f"{where}.source"))
        ref = self.model_ref(src.get("model"), f"{where}.source.model")
        tid, tok = src.get("token_id"), src.get("token")
        if (tid is None) == (tok is None):
            problems.append(f"{where}.source: give one of token_id or token")
        elif tid is not None and (not isinstance(tid, int) or isinstance(tid, bool) or tid < 0):
            problems.append(f"{where}.source: token_id must be a non-negative integer, got {tid!r}")
        elif tok is not None and not isinstance(tok, str):
            problems.append(f"{where}.source: token must be a string, got {tok!r}")
        return TokenSource("model_token", ref, tid, tok, force is True) if ref else None
