"""Hugging Face checkpoints <-> the params pytree, straight onto a device mesh.

The name map is one bijection per family: HF `model.layers.{i}.<module>` <-> pytree path
`model/layers/<module>` at index i of the stacked leading axis; every other tensor keeps its HF
path. Loading builds each process's addressable shards only (`jax.make_array_from_callback` over
memory-mapped slices); saving streams one tensor at a time to sharded safetensors files.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
from pathlib import Path
from typing import Iterator, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jmerge import distributed, sharding as shd
from jmerge.config import ModelConfig
from jmerge.errors import JmergeError, collect, first_line
from jmerge.io.atomic import atomic_dir
from jmerge.io.files import loads_json, read_text, regular_file
from jmerge.io.safetensors_io import write_file
from jmerge.models.layout import abstract_params
from jmerge.progress import bar as progress_bar

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "generation_config.json")
# Buffers some exports include that are not parameters.
IGNORED = re.compile(r"rotary_emb\.inv_freq$|\.masked_bias$|\.attn\.bias$")


class TensorSource(Protocol):
    # True when `read_into(name, index, out)` copies tensor[index] from the file straight into
    # `out` (a shard buffer), in the tensor's own dtype; False when tensors are computed
    # (dequantized, adapted) and only `array` gives them.
    reads_into: bool

    def names(self) -> list[str]: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def dtype(self, name: str) -> np.dtype: ...
    def array(self, name: str) -> np.ndarray: ...


def leaf_names(path: tuple[str, ...], cfg: ModelConfig) -> list[str]:
    """HF tensor names held by one pytree leaf (L names for a stacked layer leaf)."""
    if path[:2] == ("model", "layers"):
        rest = ".".join(path[2:])
        return [f"model.layers.{i}.{rest}" for i in range(cfg.num_layers)]
    return [".".join(path)]


def leaf_paths(cfg: ModelConfig) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
    flat = jax.tree_util.tree_flatten_with_path(abstract_params(cfg))[0]
    return {tuple(k.key for k in p): a for p, a in flat}


def hf_layout(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name the config implies, with its HF shape, in HF's usual order."""
    out = {}
    for path, a in leaf_paths(cfg).items():
        names = leaf_names(path, cfg)
        shape = tuple(a.shape[1:]) if path[:2] == ("model", "layers") else tuple(a.shape)
        for n in names:
            out[n] = shape
    return dict(sorted(out.items(), key=lambda kv: _order(kv[0])))


def _order(name: str):
    m = re.match(r"model\.layers\.(\d+)\.", name)
    if m:
        return (1, int(m.group(1)), name)
    return (0 if "embed" in name else 2 if name.startswith("model.") else 3, 0, name)


def validate(src: TensorSource, cfg: ModelConfig, where: str) -> None:
    """Every missing, unexpected or mis-shaped tensor, reported at once."""
    want = hf_layout(cfg)
    have = set(src.names())
    problems = [f"missing tensor {n}" for n in want if n not in have]
    for n in sorted(have - set(want)):
        if IGNORED.search(n) or (n == "lm_head.weight" and cfg.tie_word_embeddings):
            continue
        problems.append(f"unexpected tensor {n}")
    for n, shape in want.items():
        if n in have and tuple(src.shape(n)) != shape:
            problems.append(f"{n} has shape {list(src.shape(n))}, config implies {list(shape)}")
    collect(problems, f"{where} does not match its config ({cfg.family})")


def _target_dtype(src: TensorSource, names: list[str], dtype) -> np.dtype:
    if dtype is not None:
        return np.dtype(dtype)
    kinds = {np.dtype(src.dtype(n)) for n in names}
    return kinds.pop() if len(kinds) == 1 else np.dtype(np.float32)


def load_params(src: TensorSource, cfg: ModelConfig, mesh: Mesh | None = None, dtype=None,
                allow_nonfinite: bool = False, where: str = "checkpoint", progress: bool = False):
    """Build the params pytree on `mesh`, each process reading only its own shards' bytes."""
    validate(src, cfg, where)
    mesh = mesh or shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1})
    leaves = leaf_paths(cfg)
    out: dict = {}
    bar = progress_bar(len(leaves), progress, "load")
    for path, a in leaves.items():
        names = leaf_names(path, cfg)
        stacked = path[:2] == ("model", "layers")
        tdt = _target_dtype(src, names, dtype)
        spec = shd.spec_for("/".join(path), tuple(a.shape), mesh)
        sharding = jax.sharding.NamedSharding(mesh, spec)

        def read(index, names=names, stacked=stacked, tdt=tdt, shape=tuple(a.shape)):
            picked, rest = (names[index[0]], index[1:]) if stacked else (names, index)
            part = tuple(len(range(*s.indices(n))) for s, n in zip(index, shape))
            out = np.empty(part, tdt)
            for j, n in enumerate(picked):
                dst = out[j] if stacked else out
                if src.reads_into and np.dtype(src.dtype(n)) == tdt:
                    src.read_into(n, rest, dst)  # straight from the file into the shard buffer
                else:
                    dst[...] = src.array(n)[rest]
            return out

        arr = jax.make_array_from_callback(tuple(a.shape), sharding, read)
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = arr
        bar.update(1)
    bar.close()
    if not allow_nonfinite:
        check_finite(out, cfg, where)
    return out


@jax.jit
def _finite(params):
    return jax.tree.map(lambda x: jnp.all(jnp.isfinite(x), axis=tuple(range(1, x.ndim))) if x.ndim > 1
                        else jnp.all(jnp.isfinite(x), keepdims=True), params)


def check_finite(params, cfg: ModelConfig, where: str) -> None:
    flags = jax.tree_util.tree_flatten_with_path(jax.device_get(_finite(params)))[0]
    bad = []
    for p, ok in flags:
        path = tuple(k.key for k in p)
        names = leaf_names(path, cfg) if path[:2] == ("model", "layers") else [".".join(path)]
        bad += [n for n, good in zip(names, np.atleast_1d(ok)) if not good]
    if bad:
        collect([f"{n} has NaN/Inf values" for n in bad],
                f"{where}: non-finite weights (pass --allow-nonfinite to load anyway)")


# ---------------------------------------------------------------------------- export

def iter_hf_tensors(params, cfg: ModelConfig, dtype=None) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, host array) in HF order, one tensor in host memory at a time."""
    flat = {tuple(k.key for k in p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    index = {}
    for path in flat:
        for i, n in enumerate(leaf_names(path, cfg)):
            index[n] = (path, i if path[:2] == ("model", "layers") else None)
    for name in hf_layout(cfg):
        path, i = index[name]
        a = shd.host_value(flat[path] if i is None else flat[path][i])
        yield name, a if dtype is None else a.astype(dtype)


def parse_size(s: str | int) -> int:
    if isinstance(s, int):
        return s
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", s, re.I)
    if not m:
        raise JmergeError(f"--max-shard-size {s!r}: expected e.g. 5GB, 500MB")
    return int(float(m.group(1)) * 1024 ** "_KMGT".index(m.group(2).upper() or "_"))


def save_hf(params, cfg: ModelConfig, out: str | Path, *, max_shard_size: str | int = "5GB",
            dtype=None, extra_from: str | Path | None = None, force: bool = False,
            progress: bool = False, tokenizer_writer=None) -> Path:
    """Write an HF model directory transformers loads: sharded safetensors + index + config.
    With several processes every one calls it: each tensor is gathered to every host in turn
    (one at a time), each process writes its own files (`write_shards`), process 0 the rest."""
    flat = {tuple(k.key for k in p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    dtypes = {}
    for path, x in flat.items():
        for n in leaf_names(path, cfg):
            dtypes[n] = np.dtype(dtype) if dtype is not None else np.dtype(x.dtype)
    layout = hf_layout(cfg)
    items = [(n, dtypes[n], layout[n]) for n in layout]
    writer = distributed.is_lead()
    bar = progress_bar(len(items), progress, "save")

    def stream():
        for _, a in iter_hf_tensors(params, cfg, dtype):
            bar.update(1)
            yield a

    with atomic_dir(out, force, inputs=(extra_from,)) as tmp:
        write_shards(tmp, items, stream(), max_shard_size)
        if writer:
            write_config(tmp, cfg, items[0][1] if dtype is None else np.dtype(dtype))
            if extra_from is not None:
                copy_tokenizer(extra_from, tmp)
            if tokenizer_writer is not None:
                tokenizer_writer(tmp)
    bar.close()
    return Path(out)


def _nbytes(item) -> int:
    return int(np.prod(item[2], dtype=np.int64)) * item[1].itemsize


def plan_shards(items, limit: int) -> list[list]:
    """Consecutive groups of (name, dtype, shape) whose bytes stay under `limit` (a tensor larger
    than the limit gets a shard of its own)."""
    shards, cur, size = [], [], 0
    for it in items:
        nbytes = _nbytes(it)
        if cur and size + nbytes > limit:
            shards.append(cur)
            cur, size = [], 0
        cur.append(it)
        size += nbytes
    shards.append(cur)
    return shards


def shard_files(items, max_shard_size="5GB") -> list[tuple[str, list]]:
    """HF's sharded layout of `items`: (file name, the items it holds) per file."""
    shards = plan_shards(items, parse_size(max_shard_size))
    if len(shards) == 1:
        return [("model.safetensors", shards[0])]
    return [(f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors", s) for i, s in enumerate(shards)]


def deal_shards(files: list[tuple[str, list]], n: int) -> list[int]:
    """The process that writes each file: the largest file first, each to the process with the
    fewest bytes so far (ties: the lower index), so loads differ by at most the largest file; a
    pure function of the layout, hence the same answer on every process."""
    sizes = [sum(_nbytes(it) for it in shard) for _, shard in files]
    load, owner = [0] * n, [0] * len(files)
    for i in sorted(range(len(files)), key=lambda i: -sizes[i]):
        k = min(range(n), key=lambda k: load[k])
        owner[i] = k
        load[k] += sizes[i]
    return owner


def write_index(dest: Path, items, files: list[tuple[str, list]]) -> None:
    """model.safetensors.index.json for a layout of more than one file."""
    if len(files) < 2:
        return
    wmap = {n: fname for fname, shard in files for n, _, _ in shard}
    (dest / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(map(_nbytes, items)), "producer": "jmerge"}, "weight_map": wmap},
        indent=2))


def write_files(dest: Path, files: list[tuple[str, list]], arrays: Iterator[np.ndarray]) -> None:
    """Some of `shard_files`' files in `dest`, pulling `arrays` in their order."""
    for fname, shard in files:
        write_file(dest / fname, shard, (next(arrays) for _ in shard))


def write_shards(dest: Path, items, arrays: Iterator[np.ndarray], max_shard_size="5GB") -> None:
    """HF's sharded safetensors layout in `dest`, pulling `arrays` in `items` order, one tensor in
    memory at a time; an index when there is more than one file. With several processes, every
    one pulls every array (each joins every gather) and writes the files `deal_shards` gives
    it; process 0 writes the index."""
    files = shard_files(items, max_shard_size)
    owners = deal_shards(files, distributed.count())
    for (fname, shard), owner in zip(files, owners):
        chunk = (next(arrays) for _ in shard)
        if owner == distributed.index():
            write_file(dest / fname, shard, chunk)
        else:
            for _ in chunk:
                pass
    if distributed.is_lead():
        write_index(dest, items, files)


def write_config(out: Path, cfg: ModelConfig, dtype: np.dtype) -> None:
    conf = dict(cfg.hf_config)
    name = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}.get(np.dtype(dtype).name)
    if name:
        conf["torch_dtype" if "torch_dtype" in conf else "dtype"] = name
    (out / "config.json").write_text(json.dumps(conf, indent=2, sort_keys=True))


def copy_tokenizer(src: str | Path, out: Path) -> None:
    src = Path(src)
    src = src.parent if src.is_file() else src
    for f in TOKENIZER_FILES:
        if (src / f).exists():
            shutil.copy2(regular_file(src / f, "tokenizer file"), out / f)


# Files holding the vocabulary itself; the others only configure it.
VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
_JSON_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
               "vocab.json", "chat_template.json", "generation_config.json")
_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


def check_tokenizer(d: str | Path, required: bool = False) -> None:
    """Every tokenizer file of a model folder, checked before any weight is read: regular files,
    UTF-8, strict JSON objects of the right shape, a tokenizer.json that the tokenizers library
    parses, chat templates that compile. A folder without tokenizer files passes unless
    `required` (a weights-only checkpoint converts; it cannot generate)."""
    d = Path(d)
    present = [f for f in TOKENIZER_FILES if (d / f).exists() and f != "generation_config.json"]
    if not present and required or present and not any(f in present for f in VOCAB_FILES):
        held = ", ".join(sorted(p.name for p in d.iterdir())) or "nothing"
        what = "incomplete tokenizer: no" if present else "no tokenizer:"
        raise JmergeError(f"{d}: {what} {' / '.join(VOCAB_FILES)} (the folder holds: {held})")
    for name in TOKENIZER_FILES:
        f = d / name
        if not f.exists():
            continue
        if name in _JSON_FILES:
            text = read_text(f, name)
            _check_tokenizer_json(f, text, loads_json(text, f, name))
        elif name.endswith((".txt", ".jinja")):
            text = read_text(f, name)
            if name == "chat_template.jinja":
                check_chat_template(text, f)
        else:
            regular_file(f, name)


def _check_tokenizer_json(f: Path, text: str, obj: dict) -> None:
    name = f.name
    if name == "tokenizer.json":
        from tokenizers import Tokenizer
        try:
            Tokenizer.from_str(text)
        except Exception as e:  # tokenizers raises its own untyped exception for a bad layout
            raise JmergeError(f"{f}: not a tokenizer the tokenizers library can read ({first_line(e)})") from None
    elif name in ("tokenizer_config.json", "chat_template.json"):
        template = obj.get("chat_template")
        named = template if isinstance(template, list) else [{"name": "default", "template": template}]
        for t in named:
            src = t.get("template") if isinstance(t, dict) else t
            if src is None and template is None:
                continue
            if not isinstance(src, str):
                raise JmergeError(f"{f}: chat_template must be a string or a list of "
                                  f"{{name, template}} objects, got {json.dumps(template)[:60]}")
            check_chat_template(src, f)
        for key in _SPECIAL_TOKENS:
            v = obj.get(key)
            if v is not None and not isinstance(v, str) and not (isinstance(v, dict) and isinstance(v.get("content"), str)):
                raise JmergeError(f"{f}: {key} must be a token string or an object with a 'content' string, "
                                  f"got {json.dumps(v)[:60]}")
    elif name in ("vocab.json", "added_tokens.json"):
        bad = next((k for k, v in obj.items() if isinstance(v, bool) or not isinstance(v, int) or v < 0), None)
        if bad is not None:
            raise JmergeError(f"{f}: token {bad!r} must map to a non-negative integer id, got {json.dumps(obj[bad])[:40]}")
    elif name == "generation_config.json":
        eos = obj.get("eos_token_id")
        ids = eos if isinstance(eos, list) else [eos]
        if eos is not None and any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids):
            raise JmergeError(f"{f}: eos_token_id must be a token id or a list of them, got {json.dumps(eos)[:60]}")


def check_chat_template(src: str, where: str | Path) -> None:
    """A Jinja syntax error in a chat template, found when the template is read rather than when
    the first prompt is rendered."""
    import jinja2
    try:
        _jinja_env().parse(src)
    except jinja2.TemplateSyntaxError as e:
        raise JmergeError(f"{where}: chat template has a Jinja syntax error on line {e.lineno}: {e.message}") from None


@functools.lru_cache(maxsize=None)
def _jinja_env():
    import jinja2
    import jinja2.ext
    import jinja2.sandbox

    class GenerationBlocks(jinja2.ext.Extension):
        """transformers' `{% generation %}...{% endgeneration %}` (assistant-token masks): parsed
        as a plain block, since only the syntax is checked here."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body, lineno=lineno)

    # The options transformers renders chat templates with (trim/lstrip blocks, loop controls).
    return jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, GenerationBlocks])


def summary(params) -> tuple[int, int]:
    leaves = jax.tree.leaves(params)
    return sum(x.size for x in leaves), sum(x.size * x.dtype.itemsize for x in leaves)

