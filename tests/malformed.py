"""Malformed-input cases: one generator of corruptions of a pristine tiny model folder.

`cases()` yields `Case(id, mutate, expect, commands)`: `mutate(model_dir)` corrupts a private copy
of the pristine folder in place and returns the model reference a command takes (the folder, or
`BASE+ADAPTER` for adapter cases); `expect` is a substring of the one error line; `commands` are
the commands that read the corrupted file. A new class of bad input is a few lines here, and
tests/test_malformed.py runs it through every command that reads that file.

The pristine folder (`make_pristine`) is a tiny llama with a character-level tokenizer and a chat
template in chat_template.jinja: config.json, generation_config.json, model.safetensors,
tokenizer.json, tokenizer_config.json, chat_template.jinja.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import numpy as np

ALL = ("convert", "check", "inspect", "generate")
TOKENIZER = ("convert", "check", "generate")  # inspect reads no tokenizer
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
ADAPTER = "adapter"  # the adapter folder a PEFT case writes beside the model folder


class Case(NamedTuple):
    id: str
    mutate: Callable[[Path], str | Path | None]
    expect: str
    commands: tuple[str, ...] = ALL


def make_pristine(model_with_tokenizer: Path, dest: Path) -> Path:
    """A copy of the tiny tokenizer model with its chat template in chat_template.jinja only."""
    shutil.copytree(model_with_tokenizer, dest)
    tc = json.loads((dest / "tokenizer_config.json").read_text())
    template = tc.pop("chat_template", None)
    if template is not None:  # transformers 4.x keeps it here
        (dest / "chat_template.jinja").write_text(template)
        (dest / "tokenizer_config.json").write_text(json.dumps(tc, indent=2))
    assert (dest / "chat_template.jinja").exists()
    return dest


# ------------------------------------------------------------------------------- file edits


def edit_json(name: str, fn: Callable[[dict], object]) -> Callable[[Path], None]:
    """A mutation replacing JSON file `name` by fn(its parsed content); fn may edit in place."""
    def mutate(d: Path) -> None:
        f = d / name
        obj = json.loads(f.read_text())
        out = fn(obj)
        f.write_text(json.dumps(obj if out is None else out))
    return mutate


def set_key(*path_and_value):
    """fn for edit_json: obj[k1][k2]... = value (value last); the literal DELETE removes the key."""
    *keys, value = path_and_value

    def fn(obj):
        node = obj
        for k in keys[:-1]:
            node = node[k]
        if value is DELETE:
            node.pop(keys[-1], None)
        else:
            node[keys[-1]] = value
    return fn


DELETE = object()


def write_raw(name: str, data: bytes | str) -> Callable[[Path], None]:
    def mutate(d: Path) -> None:
        (d / name).write_bytes(data.encode() if isinstance(data, str) else data)
    return mutate


def non_utf8(name: str) -> Callable[[Path], None]:
    """Latin-1 bytes inside an otherwise valid JSON/text file."""
    def mutate(d: Path) -> None:
        raw = (d / name).read_bytes()
        at = raw.index(b'"') + 1 if b'"' in raw else 0
        (d / name).write_bytes(raw[:at] + b"caf\xe9 " + raw[at:])
    return mutate


def fifo(name: str) -> Callable[[Path], None]:
    """A named pipe in place of the file: opening it for reading would block forever."""
    def mutate(d: Path) -> None:
        f = d / name
        if f.exists():
            f.unlink()
        os.mkfifo(f)
    return mutate


def remove(*names: str) -> Callable[[Path], None]:
    def mutate(d: Path) -> None:
        for n in names:
            (d / n).unlink()
    return mutate


def chain(*fns: Callable[[Path], object]) -> Callable[[Path], object]:
    """Mutations applied in order; the last model reference one returns wins."""
    def mutate(d: Path):
        ref = None
        for fn in fns:
            got = fn(d)
            ref = got if got is not None else ref
        return ref
    return mutate


# -------------------------------------------------------------------------- safetensors edits


def read_header(f: Path) -> tuple[dict, bytes]:
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_header(f: Path, header: object, data: bytes, raw_text: bytes | None = None) -> None:
    text = raw_text if raw_text is not None else json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    f.write_bytes(struct.pack("<Q", len(text)) + text + data)


def edit_header(fn: Callable[[dict], object], name: str = WEIGHTS) -> Callable[[Path], None]:
    """A mutation of a safetensors header: fn(header) edits it in place or returns a new one."""
    def mutate(d: Path) -> None:
        f = d / name
        header, data = read_header(f)
        out = fn(header)
        write_header(f, header if out is None else out, data)
    return mutate


def header_text(fn: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    """A mutation of the raw header bytes (for what json.dumps cannot write)."""
    def mutate(d: Path) -> None:
        f = d / WEIGHTS
        header, data = read_header(f)
        write_header(f, None, data, fn(json.dumps(header).encode()))
    return mutate


Q0, Q1 = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"


def entry(key: str, value, tensor: str = Q0):
    return edit_header(set_key(tensor, key, value))


def overlap(h: dict) -> None:
    """Layer 1's q_proj claims the bytes of layer 0's (same size, so only the overlap is wrong)."""
    h[Q1]["data_offsets"] = list(h[Q0]["data_offsets"])


def shift_past_end(h: dict) -> None:
    last = max((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][1])
    b, e = h[last]["data_offsets"]
    h[last]["data_offsets"] = [b + 4096, e + 4096]


def negative_offset(h: dict) -> None:
    b, e = h[Q0]["data_offsets"]
    h[Q0]["data_offsets"] = [-(e - b), 0]


def truncate(n: int, name: str = WEIGHTS) -> Callable[[Path], None]:
    """Keep the first n bytes (n < 0: drop the last -n)."""
    def mutate(d: Path) -> None:
        f = d / name
        f.write_bytes(f.read_bytes()[:n])
    return mutate


# ------------------------------------------------------------------------------ sharded layout


def shard(d: Path) -> None:
    """Split model.safetensors in two shards with an index, as transformers does."""
    from safetensors.numpy import load_file, save_file
    tensors = load_file(str(d / WEIGHTS))
    names = sorted(tensors)
    half = len(names) // 2
    parts = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    wmap = {}
    for fname, keys in parts.items():
        save_file({k: tensors[k] for k in keys}, str(d / fname), metadata={"format": "pt"})
        wmap.update({k: fname for k in keys})
    (d / WEIGHTS).unlink()
    (d / INDEX).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": wmap}))


def sharded(*fns: Callable[[Path], object]) -> Callable[[Path], object]:
    return chain(shard, *fns)


def first_shard_entry(value) -> Callable[[dict], None]:
    def fn(obj):
        key = next(iter(obj["weight_map"]))
        obj["weight_map"][key] = value
    return fn


# ---------------------------------------------------------------------------------- PEFT adapter

RANK = 4


def adapter(config: dict | None = None, tensors: Callable[[dict], None] | None = None,
            raw_config: bytes | None = None) -> Callable[[Path], str]:
    """A LoRA adapter on q_proj of every layer, written beside the model; returns BASE+ADAPTER.
    `config` overrides adapter_config.json keys; `tensors(dict)` edits the arrays first."""
    from safetensors.numpy import save_file

    def mutate(d: Path) -> str:
        cfg = json.loads((d / "config.json").read_text())
        hidden, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
        out = cfg["num_attention_heads"] * cfg.get("head_dim", hidden // cfg["num_attention_heads"])
        a = d.parent / ADAPTER
        a.mkdir()
        conf = {"peft_type": "LORA", "r": RANK, "lora_alpha": 8, "target_modules": ["q_proj"],
                "base_model_name_or_path": str(d), "use_rslora": False, "fan_in_fan_out": False}
        conf.update(config or {})
        (a / "adapter_config.json").write_bytes(raw_config if raw_config is not None else json.dumps(conf).encode())
        rng = np.random.default_rng(0)
        arrays = {}
        for i in range(layers):
            p = f"base_model.model.model.layers.{i}.self_attn.q_proj"
            arrays[f"{p}.lora_A.weight"] = rng.standard_normal((RANK, hidden)).astype(np.float32)
            arrays[f"{p}.lora_B.weight"] = rng.standard_normal((out, RANK)).astype(np.float32)
        if tensors is not None:
            tensors(arrays)
        save_file(arrays, str(a / "adapter_model.safetensors"))
        return f"{d}+{a}"
    return mutate


A0 = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B0 = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def then_adapter_file(fn: Callable[[Path], None]) -> Callable[[Path], str]:
    """An adapter whose folder is then corrupted by fn (a mutation of the adapter folder)."""
    make = adapter()

    def mutate(d: Path) -> str:
        ref = make(d)
        fn(d.parent / ADAPTER)
        return ref
    return mutate


# ------------------------------------------------------------------------------------ GGUF file

_GGUF_LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
               "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}
_GGUF_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
GGUF = "m.gguf"


def _gguf_name(hf: str) -> str:
    if hf in _GGUF_TOP:
        return _GGUF_TOP[hf]
    _, _, i, rest = hf.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{i}.{_GGUF_LAYER[module]}.{kind}"


def gguf_model(tokens: bool = True, chat_template: str | None = None, **meta) -> Callable[[Path], str]:
    """The model's weights as an F32 GGUF file beside it (returned as the reference), with
    metadata keys (without the `llama.` prefix) overridden by `meta`; None drops a key."""
    def mutate(d: Path) -> str:
        import gguf
        from safetensors.numpy import load_file
        cfg = json.loads((d / "config.json").read_text())
        kv = {"block_count": cfg["num_hidden_layers"], "context_length": cfg["max_position_embeddings"],
              "embedding_length": cfg["hidden_size"], "feed_forward_length": cfg["intermediate_size"],
              "attention.head_count": cfg["num_attention_heads"],
              "attention.head_count_kv": cfg["num_key_value_heads"],
              "attention.layer_norm_rms_epsilon": 1e-6, "rope.freq_base": 10000.0}
        kv.update(meta)
        f = d.parent / GGUF
        w = gguf.GGUFWriter(str(f), "llama")
        for k, v in kv.items():
            if v is None:
                continue
            add = w.add_string if isinstance(v, str) else w.add_float32 if isinstance(v, float) else w.add_uint32
            add(f"llama.{k}", v)
        if tokens:
            vocab = json.loads((d / "tokenizer.json").read_text())["model"]["vocab"]
            w.add_tokenizer_model("gpt2")
            w.add_token_list([t for t, _ in sorted(vocab.items(), key=lambda x: x[1])])
            w.add_token_types([1] * len(vocab))
            w.add_token_merges([])
            w.add_eos_token_id(2)
            w.add_chat_template(chat_template or (d / "chat_template.jinja").read_text())
        for name, x in load_file(str(d / WEIGHTS)).items():
            w.add_tensor(_gguf_name(name), x)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return str(f)
    return mutate


# ---------------------------------------------------------------------------------------- cases

JSON_FILES = {  # file -> commands that read it
    "config.json": ALL,
    "tokenizer.json": TOKENIZER,
    "tokenizer_config.json": TOKENIZER,
    "generation_config.json": TOKENIZER,
}
WRONG_KINDS = {"list": [1, 2], "null": None, "number": 3, "string": "x"}
INT_FIELDS = ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size",
              "intermediate_size", "num_key_value_heads", "max_position_embeddings")
BAD_INTS = {"zero": 0, "negative": -4, "string": "4", "float": 2.5, "bool": True, "huge": 10 ** 12,
            "list": [4]}
NUM_FIELDS = (("rms_norm_eps",), ("rope_parameters", "rope_theta"))
BAD_NUMS = {"zero": 0, "negative": -1.0, "string": "1e-6", "bool": True, "list": [1.0]}


def cases() -> Iterator[Case]:
    # --- every JSON file: the wrong kind at the top, non-UTF-8 bytes, broken syntax, a FIFO
    for name, cmds in JSON_FILES.items():
        for kind, v in WRONG_KINDS.items():
            yield Case(f"{name}-top-{kind}", write_raw(name, json.dumps(v)), "must be a JSON object", cmds)
        yield Case(f"{name}-non-utf8", non_utf8(name), "not UTF-8", cmds)
        yield Case(f"{name}-syntax", write_raw(name, '{"a": 1,'), "not valid JSON", cmds)
        yield Case(f"{name}-fifo", fifo(name), "not a regular file", cmds)
    yield Case("config.json-nan-literal", write_raw_sub("config.json", '"rms_norm_eps": 1e-06', '"rms_norm_eps": NaN'),
               "NaN is not valid JSON")
    yield Case("config.json-infinity-literal",
               write_raw_sub("config.json", '"rms_norm_eps": 1e-06', '"rms_norm_eps": Infinity'),
               "Infinity is not valid JSON")
    yield Case("config.json-missing", remove("config.json"), "no config.json")
    yield Case("config.json-directory", chain(remove("config.json"), lambda d: (d / "config.json").mkdir()),
               "is a directory")

    # --- config.json: every size field typed and in range, every float finite and positive
    for key in INT_FIELDS:
        for what, v in BAD_INTS.items():
            yield Case(f"config-{key}-{what}", edit_json("config.json", set_key(key, v)), f"{key} must be an integer")
    for key in ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size", "intermediate_size"):
        yield Case(f"config-{key}-null", edit_json("config.json", set_key(key, None)), f"missing required field '{key}'")
    for path in NUM_FIELDS:
        for what, v in BAD_NUMS.items():
            yield Case(f"config-{'.'.join(path)}-{what}", edit_json("config.json", set_key(*path, v)),
                       f"{path[-1]} must be a finite number > 0")
        # 1e400 is valid JSON syntax that Python reads as inf
        yield Case(f"config-{'.'.join(path)}-overflow",
                   edit_json_text("config.json", path, "1e400"), f"{path[-1]} must be a finite number > 0")
    yield Case("config-heads-not-dividing-hidden",
               edit_json("config.json", chain_dict(set_key("head_dim", DELETE), set_key("num_attention_heads", 5))),
               "not divisible by num_attention_heads")
    yield Case("config-kv-heads-not-dividing", edit_json("config.json", set_key("num_key_value_heads", 3)),
               "does not divide num_attention_heads")
    yield Case("config-head_dim-odd", edit_json("config.json", set_key("head_dim", 7)), "is odd")
    yield Case("config-architectures-string", edit_json("config.json", set_key("architectures", "LlamaForCausalLM")),
               "architectures must be a list")
    yield Case("config-architectures-unknown",
               edit_json("config.json", lambda c: c.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")),
               "unsupported architecture GPT2LMHeadModel")
    yield Case("config-model_type-number",
               edit_json("config.json", lambda c: c.update(architectures=None, model_type=5)), "model_type must be a string")
    yield Case("config-rope_parameters-list", edit_json("config.json", set_key("rope_parameters", [1])),
               "rope_parameters must be an object")
    yield Case("config-rope_type-unknown", edit_json("config.json", set_key("rope_parameters", "rope_type", "yarnish")),
               "unsupported rope type")
    yield Case("config-rope_type-number", edit_json("config.json", set_key("rope_parameters", "rope_type", 3)),
               "rope_type must be a string")
    yield Case("config-llama3-equal-freq-factors",
               edit_json("config.json", set_key("rope_parameters", {"rope_type": "llama3", "factor": 8.0,
                                                                    "low_freq_factor": 2.0, "high_freq_factor": 2.0,
                                                                    "rope_theta": 10000.0})),
               "low_freq_factor != high_freq_factor")
    yield Case("config-rope-factor-zero", edit_json("config.json", set_key("rope_parameters", "factor", 0)),
               "factor must be a finite number > 0")
    yield Case("config-tie_word_embeddings-string", edit_json("config.json", set_key("tie_word_embeddings", "no")),
               "tie_word_embeddings must be true or false")
    yield Case("config-attention_bias-number", edit_json("config.json", set_key("attention_bias", 1)),
               "attention_bias must be true or false")
    yield Case("config-eos-outside-vocab", edit_json("config.json", set_key("eos_token_id", 1000)),
               "eos_token_id must be a token id")
    yield Case("config-eos-list-of-strings", edit_json("config.json", set_key("eos_token_id", ["</s>"])),
               "eos_token_id must be a token id")
    yield Case("config-bos-negative", edit_json("config.json", set_key("bos_token_id", -1)), "bos_token_id must be")
    yield Case("config-layer_types-length", edit_json("config.json", set_key("layer_types", ["full_attention"])),
               "layer_types has 1 entries for 3 layers")
    yield Case("config-layer_types-string", edit_json("config.json", set_key("layer_types", "full_attention")),
               "layer_types must be a list")
    yield Case("config-hidden_act-unknown", edit_json("config.json", set_key("hidden_act", "gelu")),
               "unsupported hidden_act")
    yield Case("config-several-at-once",
               edit_json("config.json", lambda c: c.update(hidden_size=0, vocab_size="97")),
               "hidden_size must be an integer in [1, 1048576], got 0; vocab_size must be")

    # --- safetensors header: kinds, offsets, sizes, overlaps, truncation, special files
    for kind, v in WRONG_KINDS.items():
        yield Case(f"header-top-{kind}", header_text(lambda t, v=v: json.dumps(v).encode()),
                   "safetensors header must be a JSON object")
        yield Case(f"header-entry-{kind}", entry_value(v), "header entry must be an object")
    for what, v in {"unknown": "F99", "number": 5, "null": None, "lowercase": "f32"}.items():
        yield Case(f"header-dtype-{what}", entry("dtype", v), "unknown dtype")
    for what, v in {"string": "x", "negative": [-1, 32], "float": [2.5, 32], "bool": [True, 32], "null": None}.items():
        yield Case(f"header-shape-{what}", entry("shape", v), "shape must be a list of non-negative integers")
    for what, v in {"string": "0", "one": [0], "three": [0, 1, 2], "reversed": [4096, 0], "float": [0.0, 4096.0],
                    "null": None}.items():
        yield Case(f"header-offsets-{what}", entry("data_offsets", v), "data_offsets must be [begin, end]")
    yield Case("header-offsets-negative", edit_header(negative_offset), "data_offsets must be [begin, end]")
    yield Case("header-offsets-overlap", edit_header(overlap), "overlap in the file")
    yield Case("header-offsets-past-end", edit_header(shift_past_end), "past the data")
    yield Case("header-size-lie", edit_header(lambda h: h[Q0].update(shape=[h[Q0]["shape"][0] * 2, h[Q0]["shape"][1]])),
               "needs")
    yield Case("header-metadata-list", edit_header(set_key("__metadata__", ["x"])), "__metadata__ must be an object")
    yield Case("header-non-utf8", header_text(lambda t: t.replace(b'"format"', b'"f\xe9rmat"')), "not UTF-8")
    yield Case("header-not-json", header_text(lambda t: t[:-5]), "not valid JSON")
    yield Case("header-nan", header_text(lambda t: t.replace(b'"pt"', b'NaN')), "NaN is not valid JSON")
    yield Case("header-length-huge", lambda d: _patch_length(d, 10 ** 12), "header length")
    yield Case("safetensors-truncated", truncate(-100), "truncated")
    yield Case("safetensors-tiny", truncate(5), "truncated safetensors file")
    yield Case("safetensors-fifo", fifo(WEIGHTS), "not a regular file")
    yield Case("safetensors-directory", chain(remove(WEIGHTS), lambda d: (d / WEIGHTS).mkdir()), "is a directory")

    # --- sharded checkpoints: the index's kinds, paths that leave the folder, missing shards
    for kind, v in WRONG_KINDS.items():
        yield Case(f"index-top-{kind}", sharded(write_raw(INDEX, json.dumps(v))), "must be a JSON object")
        yield Case(f"index-weight_map-{kind}", sharded(edit_json(INDEX, set_key("weight_map", v))),
                   "weight_map must be a non-empty object")
    yield Case("index-weight_map-empty", sharded(edit_json(INDEX, set_key("weight_map", {}))),
               "weight_map must be a non-empty object")
    yield Case("index-non-utf8", sharded(non_utf8(INDEX)), "not UTF-8")
    yield Case("index-fifo", sharded(fifo(INDEX)), "not a regular file")
    yield Case("index-path-escapes", sharded(edit_json(INDEX, first_shard_entry("../../../../etc/hostname"))),
               "lies outside the folder")
    yield Case("index-path-absolute", sharded(edit_json(INDEX, first_shard_entry("/etc/hostname"))),
               "must be a relative file name")
    yield Case("index-path-number", sharded(edit_json(INDEX, first_shard_entry(7))), "must be a relative file name")
    yield Case("index-shard-missing", sharded(remove("model-00002-of-00002.safetensors")), "shard files missing")
    yield Case("index-shard-fifo", sharded(fifo("model-00001-of-00002.safetensors")), "not a regular file")

    # --- tokenizer files: missing, broken, bad templates (checked before any weight is read)
    yield Case("tokenizer-json-missing", remove("tokenizer.json"), "incomplete tokenizer", TOKENIZER)
    yield Case("tokenizer-all-missing", remove("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"),
               "no tokenizer", ("generate",))
    yield Case("tokenizer-json-broken", write_raw("tokenizer.json", '{"version": "1.0", "model": 5}'),
               "not a tokenizer the tokenizers library can read", TOKENIZER)
    yield Case("tokenizer-json-truncated", truncate(200, "tokenizer.json"), "not valid JSON", TOKENIZER)
    yield Case("chat_template.jinja-syntax", write_raw("chat_template.jinja", "{% for m in messages %}{{ m.content }}"),
               "Jinja syntax error", TOKENIZER)
    yield Case("chat_template.jinja-non-utf8", non_utf8("chat_template.jinja"), "not UTF-8", TOKENIZER)
    yield Case("chat_template.jinja-fifo", fifo("chat_template.jinja"), "not a regular file", TOKENIZER)
    yield Case("tokenizer_config-chat_template-syntax",
               chain(remove("chat_template.jinja"),
                     edit_json("tokenizer_config.json", set_key("chat_template", "{{ messages[0].content }"))),
               "Jinja syntax error", TOKENIZER)
    yield Case("tokenizer_config-chat_template-number", edit_json("tokenizer_config.json", set_key("chat_template", 5)),
               "chat_template must be a string", TOKENIZER)
    yield Case("tokenizer_config-eos_token-number", edit_json("tokenizer_config.json", set_key("eos_token", 2)),
               "eos_token must be a token string", TOKENIZER)
    yield Case("generation_config-eos-string", edit_json("generation_config.json", set_key("eos_token_id", "x")),
               "eos_token_id must be a token id", TOKENIZER)

    # --- PEFT LoRA adapters: adapter_config.json kinds and numbers, A/B ranks, targets
    for what, (v, expect) in {"string": ("4", "'r' must be"), "float": (4.5, "'r' must be"),
                              "bool": (True, "'r' must be"), "null": (None, "'r' must be"),
                              "zero": (0, "r must be a positive integer"),
                              "negative": (-4, "r must be a positive integer")}.items():
        yield Case(f"adapter-r-{what}", adapter({"r": v}), expect)
    for what, (v, expect) in {"string": ("8", "'lora_alpha' must be"), "list": ([8], "'lora_alpha' must be"),
                              "zero": (0, "lora_alpha must be a finite number > 0")}.items():
        yield Case(f"adapter-lora_alpha-{what}", adapter({"lora_alpha": v}), expect)
    yield Case("adapter-rank_pattern-bad-regex", adapter({"rank_pattern": {"q_proj[": 4}}),
               "is not a valid regular expression")
    yield Case("adapter-alpha_pattern-bad-regex", adapter({"alpha_pattern": {"(q_proj": 4}}),
               "is not a valid regular expression")
    yield Case("adapter-rank_pattern-zero", adapter({"rank_pattern": {"q_proj": 0}}), "must be a positive integer")
    yield Case("adapter-rank_pattern-list", adapter({"rank_pattern": ["q_proj"]}), "'rank_pattern' must be")
    yield Case("adapter-use_rslora-string", adapter({"use_rslora": "yes"}), "'use_rslora' must be")
    yield Case("adapter-use_dora", adapter({"use_dora": True}), "DoRA adapters are not supported")
    yield Case("adapter-peft_type", adapter({"peft_type": "IA3"}), "peft_type 'IA3' unsupported")
    yield Case("adapter-base-number", adapter({"base_model_name_or_path": 3}), "'base_model_name_or_path' must be")
    yield Case("adapter-config-r-mismatch", adapter({"r": 8}), "adapter_config.json says r=8")
    yield Case("adapter-ab-rank-mismatch", adapter(tensors=lambda t: t.update({B0: t[B0][:, :3].copy()})),
               "lora_A has rank 4 but lora_B has rank 3")
    yield Case("adapter-lora_A-vector", adapter(tensors=lambda t: t.update({A0: t[A0][0].copy()})),
               "must both be matrices")
    yield Case("adapter-lora_B-missing", adapter(tensors=lambda t: t.pop(B0)), "has no matching lora_B")
    yield Case("adapter-lora_A-missing", adapter(tensors=lambda t: t.pop(A0)), "has no matching lora_A")
    yield Case("adapter-lora-int", adapter(tensors=lambda t: t.update({A0: t[A0].astype(np.int32)})), "must be floats")
    yield Case("adapter-delta-shape", adapter(tensors=lambda t: t.update({A0: t[A0][:, :16].copy()})), "would be")
    yield Case("adapter-target-absent", adapter(tensors=lambda t: t.update(
        {A0.replace("q_proj", "nope"): t.pop(A0), B0.replace("q_proj", "nope"): t.pop(B0)})), "the base lacks")
    for kind, v in WRONG_KINDS.items():
        yield Case(f"adapter_config-top-{kind}", adapter(raw_config=json.dumps(v).encode()), "must be a JSON object")
    yield Case("adapter_config-non-utf8", adapter(raw_config=b'{"peft_type": "LORA", "r": 4, "x": "caf\xe9"}'),
               "not UTF-8")
    yield Case("adapter_config-nan", adapter(raw_config=b'{"peft_type": "LORA", "r": 4, "lora_alpha": NaN}'),
               "NaN is not valid JSON")
    yield Case("adapter_config-fifo", then_adapter_file(fifo("adapter_config.json")), "not a regular file")
    yield Case("adapter_model-fifo", then_adapter_file(fifo("adapter_model.safetensors")), "not a regular file")
    yield Case("adapter_model-overlap", then_adapter_file(
        edit_header(lambda h: h[B0.replace("layers.0", "layers.1")].update(data_offsets=list(h[B0]["data_offsets"])),
                    "adapter_model.safetensors")), "overlap in the file")

    # --- GGUF files: metadata numbers checked before any shape is computed from them
    yield Case("gguf-head_count-zero", gguf_model(**{"attention.head_count": 0}), "num_attention_heads must be")
    yield Case("gguf-head_count_kv-not-dividing", gguf_model(**{"attention.head_count_kv": 3}), "does not divide")
    yield Case("gguf-block_count-huge", gguf_model(block_count=10 ** 6), "num_hidden_layers must be")
    yield Case("gguf-embedding_length-string", gguf_model(embedding_length="wide"), "bad GGUF metadata value")
    yield Case("gguf-block_count-missing", gguf_model(block_count=None), "lacks llama.block_count")
    yield Case("gguf-freq_base-zero", gguf_model(**{"rope.freq_base": 0.0}), "rope_theta must be a finite number > 0")
    yield Case("gguf-context_length-zero", gguf_model(context_length=0), "max_position_embeddings must be")
    yield Case("gguf-chat-template-syntax", gguf_model(chat_template="{% if x %}"), "Jinja syntax error",
               ("convert", "generate"))
    yield Case("gguf-no-tokenizer", gguf_model(tokens=False), "has no tokenizer", ("generate",))
    yield Case("gguf-fifo", chain(gguf_model(), lambda d: fifo(GGUF)(d.parent), lambda d: str(d.parent / GGUF)),
               "not a regular file")
    yield Case("gguf-truncated", chain(gguf_model(), lambda d: truncate(300, GGUF)(d.parent), lambda d: str(d.parent / GGUF)),
               "not a readable GGUF file")


def write_raw_sub(name: str, old: str, new: str) -> Callable[[Path], None]:
    """Replace text in a file whose pristine form json.dumps wrote (indent=2 by transformers)."""
    def mutate(d: Path) -> None:
        f = d / name
        text = f.read_text()
        compact = json.dumps(json.loads(text))
        assert old in compact, old
        f.write_text(compact.replace(old, new))
    return mutate


def edit_json_text(name: str, path: tuple[str, ...], literal: str) -> Callable[[Path], None]:
    """Set a key to a raw JSON literal (one json.dumps cannot produce, e.g. 1e400)."""
    def mutate(d: Path) -> None:
        f = d / name
        obj = json.loads(f.read_text())
        node = obj
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = "@@LITERAL@@"
        f.write_text(json.dumps(obj).replace('"@@LITERAL@@"', literal))
    return mutate


def chain_dict(*fns: Callable[[dict], None]) -> Callable[[dict], None]:
    def fn(obj: dict) -> None:
        for f in fns:
            f(obj)
    return fn


def entry_value(v) -> Callable[[Path], None]:
    return edit_header(set_key(Q0, v))


def _patch_length(d: Path, n: int) -> None:
    f = d / WEIGHTS
    raw = f.read_bytes()
    f.write_bytes(struct.pack("<Q", n) + raw[8:])
