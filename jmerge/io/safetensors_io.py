"""Safetensors files read by memory map and written tensor by tensor.

Own reader rather than `safetensors.safe_open`: numpy has no bfloat16 there, and we want every
header lie (offsets past the end, sizes that disagree with shapes, truncated files) reported as one
clear error before any weight is read. Slices of the memory map are zero-copy until touched, so a
process reads only the bytes of the shards it owns.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Iterable

import ml_dtypes
import numpy as np

from jmerge.errors import JmergeError
from jmerge.io.files import inside, loads_json, read_json, regular_file

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
CODES = {v: k for k, v in DTYPES.items()}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
MAX_HEADER = 100 * 1024 * 1024
INDEX = "model.safetensors.index.json"


class SafetensorsFile:
    """One .safetensors file: validated header, lazily memory-mapped tensors."""

    def __init__(self, path: str | Path):
        self.path = regular_file(path, "safetensors file")
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                raw = f.read(8)
                if len(raw) < 8:
                    raise JmergeError(f"{self.path}: truncated safetensors file ({size} bytes)")
                (n,) = struct.unpack("<Q", raw)
                if n > MAX_HEADER or 8 + n > size:
                    raise JmergeError(f"{self.path}: header length {n} does not fit in a {size}-byte file (truncated or not safetensors)")
                header = loads_json(f.read(n), self.path, "safetensors header")
        except OSError as e:
            raise JmergeError(f"{self.path}: cannot read ({e.strerror})") from None
        self.metadata = header.pop("__metadata__", None) or {}
        if not isinstance(self.metadata, dict):
            raise JmergeError(f"{self.path}: safetensors header __metadata__ must be an object of strings")
        self.data_start = 8 + n
        data_len = size - self.data_start
        self.entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, e in header.items():
            self.entries[name] = self._entry(name, e, data_len)
        self._check_overlap()
        self._mm = None

    def _entry(self, name: str, e, data_len: int) -> tuple[np.dtype, tuple[int, ...], int, int]:
        where = f"{self.path}: tensor {name!r}"
        if not isinstance(e, dict):
            raise JmergeError(f"{where}: header entry must be an object with dtype, shape and data_offsets")
        code = e.get("dtype")
        if not isinstance(code, str) or code not in DTYPES:
            raise JmergeError(f"{where}: unknown dtype {json.dumps(code)[:40]}; known: {', '.join(DTYPES)}")
        shape, offsets = e.get("shape"), e.get("data_offsets")
        if not _int_list(shape):
            raise JmergeError(f"{where}: shape must be a list of non-negative integers, got {json.dumps(shape)[:60]}")
        if not _int_list(offsets) or len(offsets) != 2 or offsets[0] > offsets[1]:
            raise JmergeError(f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end, "
                              f"got {json.dumps(offsets)[:60]}")
        dtype, (begin, end) = DTYPES[code], offsets
        want = math.prod(shape) * dtype.itemsize  # Python ints: a lying shape cannot overflow
        if end - begin != want:
            raise JmergeError(f"{where}: header says {end - begin} bytes, shape {shape} {code} needs {want}")
        if end > data_len:
            raise JmergeError(f"{where}: ends at byte {end} past the data ({data_len} bytes): truncated file")
        return dtype, tuple(shape), begin, end

    def _check_overlap(self) -> None:
        """Two tensors sharing bytes is not a valid file (a write to one would change the other)."""
        spans = sorted((b, e, n) for n, (_, _, b, e) in self.entries.items() if e > b)
        for (_, end, prev), (begin, _, name) in zip(spans, spans[1:]):
            if begin < end:
                raise JmergeError(f"{self.path}: tensors {prev!r} and {name!r} overlap in the file "
                                  f"(byte {begin} < {end}); corrupt header")

    def _map(self) -> np.memmap:
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        return self._mm

    def read_into(self, name: str, index: tuple, out: np.ndarray) -> None:
        """Copy tensor[index] into `out`. A whole-row range is one `readinto` of its bytes
        (page cache -> destination, one copy); other slices go through the memory map."""
        dtype, shape, begin, end = self.entries[name]
        rows = index[0] if index else slice(None)
        whole_rows = all(s == slice(None) or s == slice(0, n, None) for s, n in zip(index[1:], shape[1:]))
        if shape and whole_rows and isinstance(rows, slice) and rows.step in (None, 1) and out.flags.c_contiguous:
            r0, r1, _ = rows.indices(shape[0])
            row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
            with open(self.path, "rb", buffering=0) as f:
                f.seek(self.data_start + begin + r0 * row)
                view = memoryview(out.view(np.uint8).reshape(-1))
                got = 0
                while got < (r1 - r0) * row:
                    n = f.readinto(view[got:])
                    if not n:
                        raise JmergeError(f"{self.path}: file shrank while reading {name}")
                    got += n
            return
        out[...] = self.array(name)[index]

    def array(self, name: str) -> np.ndarray:
        """A zero-copy view of one tensor; slicing it reads only the bytes asked for."""
        dtype, shape, begin, end = self.entries[name]
        buf = self._map()[self.data_start + begin: self.data_start + end]
        return buf.view(dtype).reshape(shape)


def _int_list(v) -> bool:
    return isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v)


class Checkpoint:
    """Tensors of a Hugging Face model directory (single file or sharded with an index)."""

    reads_into = True

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.root.exists():
            raise JmergeError(f"{self.root}: no such file or directory")
        files = self._files()
        self.files = [SafetensorsFile(f) for f in files]
        self.where: dict[str, SafetensorsFile] = {}
        for sf in self.files:
            for name in sf.entries:
                if name in self.where:
                    raise JmergeError(f"{self.root}: tensor {name!r} appears in two files")
                self.where[name] = sf

    def _files(self) -> list[Path]:
        r = self.root
        if not r.is_dir():
            if r.suffix in PICKLE_SUFFIXES:
                raise JmergeError(pickle_message(r))
            return [regular_file(r, "safetensors file")]
        index = r / INDEX
        if index.exists():
            obj = read_json(index, "safetensors index")
            wmap = obj.get("weight_map")
            if not isinstance(wmap, dict) or not wmap:
                raise JmergeError(f"{index}: weight_map must be a non-empty object tensor name -> shard file, "
                                  f"got {json.dumps(wmap)[:60]}")
            for name, fname in wmap.items():
                inside(r, fname, f"shard of tensor {name!r}")
            names = sorted(set(wmap.values()))
            missing = [n for n in names if not (r / n).exists()]
            if missing:
                raise JmergeError(f"{index}: shard files missing: {', '.join(missing)}")
            return [r / n for n in names]
        found = sorted(r.glob("*.safetensors"))
        if found:
            return found
        pickles = [p for p in r.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise JmergeError(pickle_message(pickles[0]))
        raise JmergeError(f"{r}: no .safetensors files found")

    def names(self) -> list[str]:
        return list(self.where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.where[name].entries[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self.where[name].entries[name][0]

    def array(self, name: str) -> np.ndarray:
        return self.where[name].array(name)

    def read_into(self, name: str, index: tuple, out: np.ndarray) -> None:
        self.where[name].read_into(name, index, out)

    def nbytes(self) -> int:
        return sum(e[3] - e[2] for sf in self.files for e in sf.entries.values())


def pickle_message(path: Path) -> str:
    return (f"{path}: pickle checkpoints are refused (unpickling runs arbitrary code). Convert it "
            "once in a trusted environment: python -c \"import torch; from safetensors.torch import "
            "save_file; save_file(torch.load('IN', weights_only=True), 'model.safetensors')\", or "
            "load with transformers and call save_pretrained(out, safe_serialization=True)")


def _header(items: list[tuple[str, np.dtype, tuple[int, ...]]], metadata: dict) -> bytes:
    header, offset = {"__metadata__": metadata}, 0
    for name, dtype, shape in items:
        n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # align the data to 8 bytes, as the reference writer does
    return struct.pack("<Q", len(raw)) + raw


def write_file(path: Path, items: list[tuple[str, np.dtype, tuple[int, ...]]],
               arrays: Iterable[np.ndarray], metadata: dict | None = None) -> None:
    """Write one safetensors file, streaming tensors in `items` order (one in memory at a time)."""
    with open(path, "wb") as f:
        f.write(_header(items, metadata or {"format": "pt"}))
        for (name, dtype, shape), a in zip(items, arrays, strict=True):
            a = np.ascontiguousarray(a)
            if a.dtype != dtype or a.shape != tuple(shape):
                raise AssertionError(f"{name}: got {a.dtype}{a.shape}, planned {dtype}{shape}")
            f.write(a.view(np.uint8).data)  # bytes view: bf16 has no buffer format code
        f.flush()
        os.fsync(f.fileno())
