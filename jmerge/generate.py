"""Batched generation: one jitted prefill + `lax.while_loop` decode over a donated KV cache.

Prompts are left-padded into batches whose length is rounded up to a bucket (powers of two from
16 to 512, then multiples of 512), and every batch of a run has the same row count, so a run
compiles one program per bucket. Params are jit *arguments*: a merged params pytree with the same
shapes, dtypes and shardings reuses the compiled programs (the search relies on this).

Memory: rows are split over data x fsdp (a batch is padded with all-padding rows to a multiple),
the KV cache also by KV heads over tensor; a long prompt is prefilled in chunks; the head's
logits are computed from its own shards. `generation_programs` lowers the same programs from
abstract params, for `--dry-run`.

Sampling: greedy (temperature 0) or temperature with optional top-k then top-p (nucleus), in that
order, as transformers applies them. Randomness comes only from `Sampling.seed`: batch i uses
fold_in(seed, i) and step t folds in t, so a run is reproducible for given prompts and batch size.

Stopping: a row stops inside the loop on any EOS id (the config's, generation_config.json's and
the tokenizer's); the loop ends when every row has stopped or after `max_new_tokens`. Stop
*strings* are checked on the host after decoding: the response is cut before the first stop
string (the stop string itself is not included) and `tokens` is cut to the shortest prefix whose
text contains it. The device loop therefore keeps going until EOS or the limit for such rows.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import tempfile
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jmerge import sharding as shd
from jmerge.config import ModelConfig, load_config
from jmerge.errors import JmergeError, first_line
from jmerge.io.files import read_json, read_text
from jmerge.models import llama
from jmerge.objectives import head_weight

# Bumped each time the generation program is traced (tests count recompilations with it).
TRACE_COUNT = [0]


@dataclasses.dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int = 0

    def __post_init__(self):
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise JmergeError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise JmergeError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise JmergeError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclasses.dataclass
class Completion:
    prompt: str | None
    response: str | None
    tokens: list[int]  # generated ids, without the EOS and without anything after a stop string
    finish_reason: str  # "eos" | "stop" | "length"


def bucket_length(n: int) -> int:
    """Padded prompt length: a power of two in [16, 512], above that a multiple of 512."""
    if n <= 512:
        return max(16, 1 << max(0, n - 1).bit_length())
    return -(-n // 512) * 512


# ---------------------------------------------------------------------------------------------
# Device side


def sample_logits(logits, key, temperature, top_p, *, greedy: bool, top_k: int, use_top_p: bool):
    """One token per row from float32 logits [B, V]: temperature, then top-k, then top-p."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if not top_k and not use_top_p:
        return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
    if top_k:
        vals, idx = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))
    else:
        idx = jnp.argsort(-logits, axis=-1)
        vals = jnp.take_along_axis(logits, idx, axis=-1)
    if use_top_p:
        # Keep the smallest prefix (by descending probability) whose mass reaches top_p: a token
        # stays when the mass before it is still below top_p, so the first always stays.
        probs = jax.nn.softmax(vals, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs
        vals = jnp.where(before < top_p, vals, -jnp.inf)
    choice = jax.random.categorical(key, vals, axis=-1)
    return jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


def _next_logits(params, cfg: ModelConfig, ids, mask, cache, mesh: Mesh):
    """Float32 logits [B, V] after the last slot, and the cache. The last hidden states are split
    along D as the head's weight is: each device multiplies its slice of the head and the
    logits are summed across devices, where XLA would otherwise gather the whole [V, D] head on
    every device at every step (2 GB for a 70B model)."""
    h, cache = llama.forward(params, cfg, ids, mask, cache=cache, last_only=True, return_hidden=True)
    path = "model/embed_tokens/weight" if cfg.tie_word_embeddings else "lm_head/weight"
    head = head_weight(params, cfg)
    h = jax.lax.with_sharding_constraint(h, NamedSharding(mesh, P(None, shd.spec_for(path, head.shape, mesh)[1])))
    return jnp.einsum("bd,vd->bv", h, head, preferred_element_type=jnp.float32), cache


def _prefill(params, cfg: ModelConfig, ids, mask, cache, chunk: int, mesh: Mesh):
    """The prompt into the cache, `chunk` slots at a time (one call when it is the whole
    prompt): activations then scale with the chunk, not the prompt. Last slot's logits [B, V]."""
    b, t = ids.shape
    if chunk < t:
        def step(cache, xs):
            _, cache = llama.forward(params, cfg, xs[0], xs[1], cache=cache, last_only=True, return_hidden=True)
            return cache, None

        split = lambda x: x[:, : t - chunk].reshape(b, -1, chunk).swapaxes(0, 1)  # noqa: E731
        cache, _ = jax.lax.scan(step, cache, (split(ids), split(mask)))
    return _next_logits(params, cfg, ids[:, t - chunk:], mask[:, t - chunk:], cache, mesh)


def _generate(params, ids, mask, cache, key, temperature, top_p, eos_ids, *, cfg: ModelConfig,
              max_new: int, greedy: bool, top_k: int, use_top_p: bool, chunk: int, mesh: Mesh):
    """ids/mask: [B, T] left-padded; eos_ids: [E] (-1 entries unused); chunk: prefill slots per
    call (divides T). Returns (tokens [B, max_new], -1 after a row stopped; the cache, for
    reuse)."""
    TRACE_COUNT[0] += 1
    b = ids.shape[0]
    # Rows without a real token pad the batch to a multiple of data x fsdp: done from the start,
    # so they never keep the loop going.
    dummy = jnp.sum(mask, axis=1) == 0
    # A reused cache holds an earlier batch: clearing mask and index is enough, stale k/v slots
    # are masked out until they are overwritten.
    cache = dict(cache, mask=jnp.zeros_like(cache["mask"]), index=jnp.zeros((), jnp.int32))

    def pick(logits, step):
        return sample_logits(logits, jax.random.fold_in(key, step), temperature, top_p,
                             greedy=greedy, top_k=top_k, use_top_p=use_top_p)

    logits, cache = _prefill(params, cfg, ids, mask, cache, chunk, mesh)
    tok = pick(logits, 0)
    out = jnp.full((b, max_new), -1, jnp.int32).at[:, 0].set(tok)
    done = jnp.isin(tok, eos_ids) | dummy

    def cond(state):
        step, _, _, _, done = state
        return (step < max_new) & ~jnp.all(done)

    def body(state):
        step, tok, cache, out, done = state
        logits, cache = _next_logits(params, cfg, tok[:, None], jnp.ones((b, 1), jnp.int32), cache, mesh)
        nxt = pick(logits, step)
        out = jax.lax.dynamic_update_slice(out, jnp.where(done, -1, nxt)[:, None], (0, step))
        return step + 1, nxt, cache, out, done | jnp.isin(nxt, eos_ids)

    _, _, cache, out, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), tok, cache, out, done))
    return out, cache


_generate_jit = jax.jit(_generate, donate_argnames=("cache",),
                        static_argnames=("cfg", "max_new", "greedy", "top_k", "use_top_p", "chunk", "mesh"))


# ---------------------------------------------------------------------------------------------
# Placement and programs (shared by Generator and generation_programs, so what a dry run
# compiles is what a run compiles)


def padded_rows(rows: int, mesh: Mesh) -> int:
    """A batch's row count rounded up to a multiple of data x fsdp: the batch is then split over
    those axes (dummy rows fill the rest) instead of replicated on every device."""
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    return -(-rows // n) * n


def cache_shardings(cfg: ModelConfig, mesh: Mesh) -> dict:
    kv = shd.batch_sharding(mesh, 5, 1, heads_axis=3, heads=cfg.num_kv_heads)  # [L, B, S, Hkv, D]
    return dict(k=kv, v=kv, mask=shd.batch_sharding(mesh, 2), index=NamedSharding(mesh, P()))


def _cache_init(cfg: ModelConfig, rows: int, length: int, dtype, mesh: Mesh):
    make = functools.partial(llama.init_cache, cfg, rows, length, dtype)
    return jax.jit(make, out_shardings=cache_shardings(cfg, mesh))


def placed_params(params, mesh: Mesh, shardings=None):
    """Params on their canonical shardings; abstract params (ShapeDtypeStruct) stay abstract."""
    shardings = shd.param_shardings(params, mesh) if shardings is None else shardings
    if all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params)):
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params, shardings)
    # A no-op for arrays already on the canonical shardings; otherwise a reshard, which is
    # what keeps the compiled program's input shardings (and so the compile cache) stable.
    return jax.device_put(params, shardings)


def _eos_slots(eos_ids: Sequence[int]) -> np.ndarray:
    # A traced argument padded to 8 slots, so other EOS ids reuse the compiled program.
    eos = np.full(max(8, len(eos_ids)), -1, np.int32)
    eos[: len(eos_ids)] = eos_ids
    return eos


# Prompt tokens per device in one prefill call: bounds the prefill's activations (an 8B MLP's
# [tokens, 14336] float32 is 470 MB at 8192) while keeping its matmuls large.
PREFILL_TOKENS = 8192


def prefill_chunk(rows: int, length: int, mesh: Mesh) -> int:
    """Prefill slots per call: `length` (a bucket, so a power of two or a multiple of 512)
    halved until the tokens per device stay within PREFILL_TOKENS; the whole prompt when it fits."""
    per_device = rows // (mesh.shape["data"] * mesh.shape["fsdp"])
    chunk = length
    while per_device * chunk > PREFILL_TOKENS and chunk % 2 == 0:
        chunk //= 2
    return chunk


def _static(cfg: ModelConfig, new_tokens: int, s: Sampling, rows: int, length: int, mesh: Mesh) -> dict:
    return dict(cfg=cfg, max_new=new_tokens, greedy=s.greedy, top_k=s.top_k, use_top_p=s.top_p < 1.0,
                chunk=prefill_chunk(rows, length, mesh), mesh=mesh)


def _scalars(s: Sampling) -> tuple:
    return jnp.float32(s.temperature or 1.0), jnp.float32(s.top_p)


def generation_programs(cfg: ModelConfig, params, mesh: Mesh, rows: int, prompt_len: int, new_tokens: int,
                        settings: Sampling = Sampling(), eos_count: int = 8) -> dict[str, jax.stages.Lowered]:
    """The programs a `Generator` compiles for one batch shape, lowered from `params` (abstract
    `jax.ShapeDtypeStruct`s or arrays; placed on `jmerge.sharding.param_shardings` as the
    Generator places them): "cache_init" (the KV cache) and "generate" (prefill + decode loop).
    `rows` is the Generator's batch size (padded here as it pads), `prompt_len` the longest
    prompt (rounded up to its bucket), `eos_count` the number of EOS ids."""
    rows, length = padded_rows(rows, mesh), bucket_length(prompt_len)
    params = placed_params(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params), mesh)
    dtype = jax.tree.leaves(params)[0].dtype
    init = _cache_init(cfg, rows, length + new_tokens, dtype, mesh)
    cache = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                         jax.eval_shape(init), cache_shardings(cfg, mesh))
    batch = jax.ShapeDtypeStruct((rows, length), jnp.int32, sharding=shd.batch_sharding(mesh, 2))
    key = jax.eval_shape(lambda: jax.random.key(0))
    eos = jax.ShapeDtypeStruct(_eos_slots([0] * eos_count).shape, jnp.int32)
    return dict(cache_init=init.lower(),
                generate=_generate_jit.lower(params, batch, batch, cache, key, *_scalars(settings), eos,
                                             **_static(cfg, new_tokens, settings, rows, length, mesh)))


# ---------------------------------------------------------------------------------------------
# Host side


class Generator:
    """Generation for one model config on one mesh; keeps KV caches between batches and calls.

    `set_params` swaps in another params pytree (e.g. a merge candidate) without recompiling.
    """

    def __init__(self, cfg: ModelConfig, params, *, mesh: Mesh | None = None, tokenizer=None,
                 max_new_tokens: int = 256, sampling: Sampling = Sampling(), batch_size: int = 16,
                 eos_ids: Sequence[int] | None = None, stop: Sequence[str] = (),
                 chat_template: bool = True, system: str | None = None, progress: bool = False):
        if max_new_tokens <= 0:
            raise JmergeError(f"max_new_tokens must be > 0, got {max_new_tokens}")
        if batch_size <= 0:
            raise JmergeError(f"batch size must be > 0, got {batch_size}")
        if any(not s for s in stop):
            raise JmergeError("stop strings must not be empty")
        self.cfg, self.tokenizer = cfg, tokenizer
        self.mesh = mesh or shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1})
        self.max_new_tokens, self.sampling, self.batch_size = max_new_tokens, sampling, batch_size
        self.eos_ids = tuple(sorted(set(eos_ids if eos_ids is not None else default_eos_ids(cfg, tokenizer))))
        self.stop, self.chat_template, self.system, self.progress = tuple(stop), chat_template, system, progress
        self.pad_id = next((i for i in (cfg.pad_token_id, getattr(tokenizer, "pad_token_id", None),
                                        0) if i is not None and 0 <= i < cfg.vocab_size), 0)
        self._caches: dict[tuple, Any] = {}
        self.set_params(params)

    def set_params(self, params) -> None:
        """Use another params pytree; it must match the first one's structure, shapes and dtypes."""
        if hasattr(self, "params"):
            old = jax.tree.map(lambda x: (x.shape, x.dtype), self.params)
            new = jax.tree.map(lambda x: (tuple(x.shape), x.dtype), params)
            if jax.tree.structure(old) != jax.tree.structure(new) or jax.tree.leaves(old) != jax.tree.leaves(new):
                raise JmergeError("new params do not match the generator's params (structure, shapes or dtypes)")
        else:
            self._param_shardings = shd.param_shardings(params, self.mesh)
        self.params = placed_params(params, self.mesh, self._param_shardings)
        self.dtype = jax.tree.leaves(self.params)[0].dtype

    def release(self) -> None:
        """Let the params go (their shapes stay, for the next `set_params`), so the next model
        can be made without this one beside it on the devices."""
        self.params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), self.params)

    # -- shardings and caches --

    def _sharding(self, rows: int, ndim: int) -> NamedSharding:
        """Inputs of a batch of `rows` (a multiple of data x fsdp: see `padded_rows`)."""
        assert rows == padded_rows(rows, self.mesh), rows
        return shd.batch_sharding(self.mesh, ndim)

    def _take_cache(self, rows: int, length: int):
        cache = self._caches.pop((rows, length), None)
        return _cache_init(self.cfg, rows, length, self.dtype, self.mesh)() if cache is None else cache

    def _return_cache(self, rows: int, length: int, cache) -> None:
        # Pin the returned cache to the input shardings so the next call hits the compile cache.
        self._caches[(rows, length)] = jax.device_put(cache, cache_shardings(self.cfg, self.mesh))

    # -- generation --

    def generate_ids(self, prompts: Sequence[Sequence[int]]) -> list[Completion]:
        """Token-id prompts -> completions in the same order (`prompt`/`response` left None)."""
        if not prompts:
            raise JmergeError("no prompts to generate from")
        if any(len(p) == 0 for p in prompts):
            raise JmergeError("a prompt is empty after tokenization")
        check_prompt_lengths(prompts, self.cfg)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        per_batch = min(self.batch_size, len(prompts))
        batches = [order[i:i + per_batch] for i in range(0, len(order), per_batch)]
        rows = padded_rows(per_batch, self.mesh)
        results: list[Completion | None] = [None] * len(prompts)
        s = self.sampling
        base_key = jax.random.key(s.seed)
        eos = _eos_slots(self.eos_ids)
        from tqdm.auto import tqdm
        for bi, batch in enumerate(tqdm(batches, desc="generate", unit="batch", disable=not self.progress,
                                        leave=False)):
            length = bucket_length(max(len(prompts[i]) for i in batch))
            # Rows past the batch's prompts (a short last batch, padding to the mesh) stay all
            # padding: masked out, done from the start, their tokens dropped.
            ids = np.full((rows, length), self.pad_id, np.int32)
            mask = np.zeros((rows, length), np.int32)
            for r, i in enumerate(batch):
                ids[r, length - len(prompts[i]):] = prompts[i]
                mask[r, length - len(prompts[i]):] = 1
            sh = self._sharding(rows, 2)
            cache_len = length + self.max_new_tokens
            cache = self._take_cache(rows, cache_len)
            out, cache = _generate_jit(
                self.params, jax.device_put(ids, sh), jax.device_put(mask, sh), cache,
                jax.random.fold_in(base_key, bi), *_scalars(s), eos,
                **_static(self.cfg, self.max_new_tokens, s, rows, length, self.mesh))
            self._return_cache(rows, cache_len, cache)
            out = shd.host_value(out)
            for r, i in enumerate(batch):
                results[i] = self._finish(out[r])
        return results

    def _finish(self, row: np.ndarray) -> Completion:
        toks = row[row >= 0].tolist()
        if toks and toks[-1] in self.eos_ids:
            return Completion(None, None, toks[:-1], "eos")
        return Completion(None, None, toks, "length")

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        return encode_prompts(self._need_tokenizer(), texts, self.chat_template, self.system)

    def generate(self, texts: Sequence[str]) -> list[Completion]:
        """Text prompts -> completions with decoded responses, stop strings applied."""
        if not texts:
            raise JmergeError("no prompts to generate from")
        results = self.generate_ids(self.encode(texts))
        for text, c in zip(texts, results):
            c.prompt = text
            c.response = self.decode(c.tokens)
            if self.stop:
                self._apply_stop(c)
        return results

    def decode(self, tokens: Sequence[int]) -> str:
        return self._need_tokenizer().decode(list(tokens), skip_special_tokens=True)

    def _apply_stop(self, c: Completion) -> None:
        hits = [(c.response.find(s), s) for s in self.stop if s in c.response]
        if not hits:
            return
        at, s = min(hits)
        c.response, c.finish_reason = c.response[:at], "stop"
        for n in range(1, len(c.tokens) + 1):
            if s in self.decode(c.tokens[:n]):
                c.tokens = c.tokens[:n]
                break

    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise JmergeError("text prompts need a tokenizer; none was given")
        return self.tokenizer


# ---------------------------------------------------------------------------------------------
# Tokenizer and EOS ids


def default_eos_ids(cfg: ModelConfig, tokenizer=None, model_dir: str | Path | None = None) -> tuple[int, ...]:
    """The config's EOS ids, generation_config.json's, and the tokenizer's EOS token."""
    ids = set(cfg.eos_ids)
    if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    if model_dir is not None:
        gc = Path(model_dir) / "generation_config.json"
        if gc.exists():
            eos = read_json(gc, "generation_config.json").get("eos_token_id")
            ids.update(i for i in (eos if isinstance(eos, list) else [eos])
                       if isinstance(i, int) and not isinstance(i, bool) and 0 <= i < cfg.vocab_size)
    return tuple(sorted(ids))


def check_prompt_lengths(prompts: Sequence[Sequence[int]], cfg: ModelConfig) -> None:
    """A prompt longer than the model's context is refused here: padded into a batch it would
    size the attention mask and KV cache past any memory (T x T per row)."""
    ctx = cfg.max_position_embeddings
    long = [(i, len(p)) for i, p in enumerate(prompts) if len(p) > ctx]
    if long:
        i, n = max(long, key=lambda x: x[1])
        raise JmergeError(f"{len(long)} prompt(s) longer than the model's context of {ctx} tokens "
                          f"(max_position_embeddings), e.g. prompt {i + 1} with {n} tokens; shorten them")


def encode_prompts(tokenizer, texts: Sequence[str], chat_template: bool = True,
                   system: str | None = None) -> list[list[int]]:
    """Prompt texts -> token ids, through the tokenizer's chat template unless it is turned off."""
    if not chat_template:
        return [list(tokenizer(t, add_special_tokens=True)["input_ids"]) for t in texts]
    import jinja2
    require_chat_template(tokenizer)
    out = []
    for t in texts:
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": t}]
        try:
            text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        except jinja2.TemplateError as e:  # a template that parses but fails (or refuses) when run
            raise JmergeError(f"the chat template fails on a prompt ({type(e).__name__}: {e})") from None
        # The template writes any BOS itself; the tokenizer must not add another.
        out.append(list(tokenizer(text, add_special_tokens=False)["input_ids"]))
    return out


def require_chat_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise JmergeError("the tokenizer has no chat template: pass one with --chat-template FILE "
                          "(a Jinja file) or use --no-chat-template to feed prompts as raw text")


def has_tokenizer_files(model: str | Path) -> bool:
    path = Path(model)
    return path.is_dir() and any((path / f).exists() for f in
                                 ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def tokenizer_home(model: str | Path) -> Path:
    """Where a model's tokenizer is read from: its folder or GGUF file; the base of BASE+ADAPTER;
    for an adapter folder without tokenizer files, the local base its config names."""
    from jmerge.io import peft, split_adapter
    path = Path(split_adapter(str(model))[0])
    if peft.is_adapter_dir(path) and not has_tokenizer_files(path):
        named = peft.read_adapter_config(path).get("base_model_name_or_path")
        if named and Path(named).exists():
            return Path(named)
    return path


def load_tokenizer(model: str | Path, write_tokenizer=None, chat_template_file: str | Path | None = None):
    """The transformers tokenizer of a model directory or GGUF file (or of what `write_tokenizer`
    writes), with an optional chat template from a Jinja file. Its files are checked first
    (kinds, encodings, JSON, templates), so every problem is one line naming the file."""
    from jmerge.io import hf
    model = Path(model)
    try:
        if has_tokenizer_files(model) or model.is_dir() and write_tokenizer is None:
            hf.check_tokenizer(model, required=True)
            if (model / "config.json").exists():
                load_config(model)  # transformers reads it too: its problems are named here
            tok = _auto_tokenizer(model)
        else:
            if write_tokenizer is None and model.suffix == ".gguf":
                from jmerge.io.gguf import read_gguf
                write_tokenizer = read_gguf(model).save_tokenizer
            if write_tokenizer is None:
                raise JmergeError(f"{model}: no tokenizer files (tokenizer.json / tokenizer_config.json)")
            with tempfile.TemporaryDirectory() as tmp:
                write_tokenizer(Path(tmp))
                if not any(Path(tmp).iterdir()):
                    raise JmergeError(f"{model}: no tokenizer files found next to the weights")
                tok = _auto_tokenizer(Path(tmp))
    except JmergeError:
        raise
    except Exception as e:  # transformers, tokenizers, sentencepiece and jinja2 share no base class
        first = first_line(e)
        raise JmergeError(f"{model}: cannot load the tokenizer ({type(e).__name__}: {first})") from None
    if chat_template_file is not None:
        f = Path(chat_template_file)
        if not f.exists():
            raise JmergeError(f"--chat-template: no such file {f}")
        tok.chat_template = read_text(f, "chat template")
        hf.check_chat_template(tok.chat_template, f)
    return tok


def _auto_tokenizer(d: Path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(d))


if __name__ == "__main__":
    from jmerge.cli import module_main
    module_main("generate")
