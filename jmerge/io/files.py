"""Reading user files safely: regular files only, text decoded with a clear error, JSON strict and
of the expected shape, paths from index files kept inside their folder.

Every reader of a user-supplied file goes through these, so a wrong file is one line naming the
file (a JmergeError), never a traceback, a hang on a FIFO, or a read outside the model folder.
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path

from jmerge.errors import JmergeError


def regular_file(path: str | Path, what: str = "file") -> Path:
    """`path` if it is an existing regular file (after symlinks); FIFOs and devices are refused
    before they are opened, since opening a FIFO blocks until a writer appears."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise JmergeError(f"{path}: no such {what}") from None
    except OSError as e:
        raise JmergeError(f"{path}: cannot read {what} ({e.strerror})") from None
    if stat.S_ISDIR(st.st_mode):
        raise JmergeError(f"{path}: is a directory, expected a {what}")
    if not stat.S_ISREG(st.st_mode):
        raise JmergeError(f"{path}: not a regular file (a FIFO, socket or device); refusing to read it as a {what}")
    return path


def read_bytes(path: str | Path, what: str = "file") -> bytes:
    path = regular_file(path, what)
    try:
        return path.read_bytes()
    except OSError as e:
        raise JmergeError(f"{path}: cannot read {what} ({e.strerror})") from None


def decode(raw: bytes, path: str | Path, what: str = "file") -> str:
    """UTF-8 text (a BOM is dropped); other bytes are one line giving the offset."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise JmergeError(f"{path}: {what} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})") from None


def read_text(path: str | Path, what: str = "file") -> str:
    return decode(read_bytes(path, what), path, what)


def _reject_constant(name: str):
    # Python's json accepts NaN / Infinity, which are not JSON: strict parsers elsewhere refuse them.
    raise ValueError(f"{name} is not valid JSON")


def loads_json(text: str | bytes, path: str | Path, what: str = "JSON file", kind: type | None = dict):
    """Strict JSON (no NaN/Infinity) whose top level is `kind` (None: anything)."""
    if isinstance(text, bytes):
        text = decode(text, path, what)
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except ValueError as e:  # JSONDecodeError is a ValueError
        raise JmergeError(f"{path}: {what} is not valid JSON ({e})") from None
    if kind is not None and not isinstance(value, kind):
        raise JmergeError(f"{path}: {what} must be a JSON {_kind_name(kind)}, got {_kind_name(type(value))}")
    return value


def read_json(path: str | Path, what: str = "JSON file", kind: type | None = dict):
    return loads_json(read_text(path, what), path, what, kind)


def read_yaml(path: str | Path, what: str = "YAML file"):
    """A YAML file's value (any kind: the caller checks it), read safely; a syntax error, a tag
    safe_load refuses or nesting too deep for the parser is one line with its position."""
    import yaml
    text = read_text(path, what)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise JmergeError(f"{path}: YAML syntax error{where}: {problem}") from None
    except RecursionError:
        raise JmergeError(f"{path}: YAML nested too deeply") from None


def yaml_float(text: str) -> str | None:
    """`text` rewritten so that YAML reads it as a float, when it is a finite number that YAML
    read as a string: PyYAML (YAML 1.1) wants a dot and a signed exponent, so `1e308` and
    `1.0e308` are strings and `1.0e+308` is a number."""
    try:
        x = float(text)
    except ValueError:
        return None
    if not math.isfinite(x):
        return None
    mant, _, exp = text.strip().lower().partition("e")
    if "." not in mant:
        mant += ".0"
    if exp and exp[0] not in "+-":
        exp = "+" + exp
    return f"{mant}e{exp}" if exp else mant


def _kind_name(kind: type) -> str:
    return {dict: "object", list: "array", str: "string", int: "integer", float: "number",
            bool: "boolean", type(None): "null"}.get(kind, kind.__name__)


def field(obj: dict, key: str, kind: type | tuple, path: str | Path, what: str, default=...):
    """obj[key] checked to be of `kind` (bool is never taken for a number)."""
    if key not in obj:
        if default is ...:
            raise JmergeError(f"{path}: {what} has no {key!r}")
        return default
    v = obj[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(v, bool) and bool not in kinds or not isinstance(v, kinds):
        names = " or ".join(_kind_name(k) for k in kinds)
        raise JmergeError(f"{path}: {what} {key!r} must be a {names}, got {json.dumps(v)[:60]}")
    return v


def dumps_json(value, **kw) -> str:
    """JSON that strict parsers read: non-finite floats become null."""
    return json.dumps(_finite(value), allow_nan=False, **kw)


def _finite(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v


def inside(root: str | Path, rel: str, what: str = "file") -> Path:
    """root / rel, refused when rel (an index file's entry) leads outside root."""
    root = Path(root)
    if not isinstance(rel, str) or not rel or os.path.isabs(rel):
        raise JmergeError(f"{root}: {what} {rel!r} must be a relative file name inside the folder")
    # Checked on the name, not on the resolved path: the Hugging Face cache keeps every file of a
    # snapshot as a symlink into ../../blobs, which a user's own folder may rightly point to.
    if os.path.normpath(rel).split(os.sep)[0] == os.pardir:
        raise JmergeError(f"{root}: {what} {rel!r} lies outside the folder; refusing to follow it")
    return root / rel
