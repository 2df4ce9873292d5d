"""Parameter settings evaluated at one tensor, as mergekit evaluates them: a scalar, a gradient
(a list of numbers interpolated over the slice's layers), or a list of `{filter, value}`
(the first whose filter is a substring of the tensor name), asked level by level."""

from __future__ import annotations

# `lookup`'s answer when no level sets the parameter (None is a value: "no filter matched").
MISSING = object()


def is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def evaluate(setting, tensor_name: str, t: float):
    """One setting at one tensor and layer position; None when no filter matches."""
    if isinstance(setting, (int, float, bool, str)) or setting is None:
        return setting
    if isinstance(setting, dict):
        setting = [setting]
    if all(is_num(e) for e in setting):
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
    """The first level (most specific first) whose setting of `name` applies here."""
    for d in levels:
        if name in d:
            v = evaluate(d[name], tensor_name, t)
            if v is not None:
                return v
    return MISSING
