"""Supervised fine-tuning in JAX: full or LoRA, response-only loss, gradient accumulation,
deterministic under a seed, resumable from orbax checkpoints.

Trainable weights and optimizer state are float32 (the master copy); the forward runs in
`compute_dtype`, so bf16 compute with f32 optimizer state is one option. LoRA merges its deltas
into each layer's weights inside the layer scan (the model's `layer_fn` hook), so the merged model
is never materialised whole.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jmerge import data
from jmerge.checkpoint import RunCheckpoint, fingerprint
from jmerge.config import ModelConfig
from jmerge.errors import JmergeError, collect
from jmerge.objectives import loop_index, response_ce

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    steps: int = 100
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-4
    warmup: int = 10
    weight_decay: float = 0.0
    max_len: int = 256
    lora_rank: int = 0  # 0: full fine-tuning
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = LORA_TARGETS
    compute_dtype: str = "float32"
    seed: int = 0
    checkpoint_every: int = 50
    clip_norm: float = 1.0

    def validate(self):
        """Every bad setting at once, before any array is made (a NaN lr would train a NaN model)."""
        problems = []
        if not (_whole(self.lora_rank) and self.lora_rank >= 0):
            problems.append(f"LoRA rank must be positive (got {self.lora_rank!r}; 0 means full fine-tuning)")
        least = dict(steps=1, batch_size=1, grad_accum=1, warmup=0, max_len=1, seed=0, checkpoint_every=1)
        for name, low in least.items():
            v = getattr(self, name)
            if not (_whole(v) and v >= low):
                problems.append(f"{name} must be a whole number >= {low}, got {v!r}")
        for name, positive in dict(lr=True, lora_alpha=True, clip_norm=True, weight_decay=False).items():
            v = getattr(self, name)
            finite = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
            if not finite or not (v > 0 if positive else v >= 0):
                problems.append(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {v!r}")
        if self.compute_dtype not in ("float32", "bfloat16", "float16"):
            problems.append(f"compute_dtype: expected float32, bfloat16 or float16, got {self.compute_dtype!r}")
        collect(problems, "fine-tuning settings")


def _whole(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# ------------------------------------------------------------------------------------ LoRA

def _target_paths(layers: dict, targets) -> list[tuple[str, str]]:
    return [(block, mod) for block in ("self_attn", "mlp") for mod in layers.get(block, {})
            if mod in targets and "weight" in layers[block][mod]]


def init_lora(params, rank: int, targets, seed: int) -> dict:
    """A: small random [L, r, in], B: zeros [L, out, r] (so training starts at the base model)."""
    layers = params["model"]["layers"]
    out: dict = {}
    key = jax.random.PRNGKey(seed)
    for i, (block, mod) in enumerate(_target_paths(layers, targets)):
        L, o, n = layers[block][mod]["weight"].shape
        a = jax.random.normal(jax.random.fold_in(key, i), (L, rank, n), jnp.float32) / np.sqrt(n)
        out.setdefault(block, {})[mod] = {"A": a, "B": jnp.zeros((L, o, rank), jnp.float32)}
    return out


def lora_layer_fn(scale: float, dtype, layers):
    """Maps one layer's (index, LoRA factors) to that layer's merged weights; the frozen stacked
    `layers` are sliced inside the scan (`loop_index`)."""
    def fn(xs):
        i, lora = xs
        merged = jax.tree.map(lambda x: x.astype(dtype), loop_index(layers, i))
        for block, mods in lora.items():
            for mod, f in mods.items():
                w = merged[block][mod]["weight"]
                merged[block][mod] = dict(merged[block][mod], weight=(w + scale * (f["B"] @ f["A"]).astype(dtype)))
        return merged
    return fn


def merge_lora(params, lora, scale: float):
    """The dense fine-tuned params: W + scale·B@A per target (in the base's dtype)."""
    out = jax.tree.map(lambda x: x, params)
    layers = out["model"]["layers"]
    for block, mods in lora.items():
        for mod, f in mods.items():
            w = layers[block][mod]["weight"]
            delta = jnp.einsum("lor,lri->loi", f["B"], f["A"]) * scale
            layers[block][mod] = dict(layers[block][mod], weight=(w.astype(jnp.float32) + delta).astype(w.dtype))
    return out


# ------------------------------------------------------------------------------ the trainer

@dataclasses.dataclass(frozen=True)
class OptSpec:
    lr: float
    warmup: int
    steps: int
    weight_decay: float
    clip_norm: float


def optimizer(spec: OptSpec) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(0.0, spec.lr, max(spec.warmup, 1), max(spec.steps, spec.warmup + 1))
    return optax.chain(optax.clip_by_global_norm(spec.clip_norm), optax.adamw(schedule, weight_decay=spec.weight_decay))


# Module-level jitted steps keyed by hashable settings: trainers with equal settings share one
# compiled program (a new Trainer does not recompile).
@functools.partial(jax.jit, static_argnames=("cfg", "lora_scale", "dtype"))
def _loss_and_grad(trainable, frozen, batch, *, cfg, lora_scale, dtype):
    def loss(trainable):
        if lora_scale is not None:
            layers = frozen["model"]["layers"]
            kw = dict(layer_xs=(jnp.arange(cfg.num_layers), trainable), layer_fn=lora_layer_fn(lora_scale, dtype, layers))
            return response_ce(frozen, cfg, batch, remat=True, **kw)
        params = jax.tree.map(lambda x: x.astype(dtype), trainable)
        return response_ce(params, cfg, batch, remat=True)
    return jax.value_and_grad(loss, has_aux=True)(trainable)


@functools.partial(jax.jit, static_argnames=("spec",), donate_argnums=(0, 1))
def _apply_update(trainable, opt_state, grads, n, *, spec: OptSpec):
    grads = jax.tree.map(lambda g: g / jnp.maximum(n, 1), grads)
    updates, opt_state = optimizer(spec).update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state


class Trainer:
    def __init__(self, cfg: ModelConfig, params, sft: SFTConfig):
        sft.validate()
        self.cfg, self.sft = cfg, sft
        self.dtype = jnp.dtype(sft.compute_dtype)
        self.frozen = jax.tree.map(lambda x: x.astype(self.dtype), params)
        if sft.lora_rank:
            self.trainable = init_lora(params, sft.lora_rank, sft.lora_targets, sft.seed)
            if not self.trainable:
                raise JmergeError(f"no LoRA targets among {sft.lora_targets}")
            self.scale = sft.lora_alpha / sft.lora_rank
        else:
            # A real copy: the update step donates these buffers, the caller's params must survive.
            self.trainable = jax.tree.map(lambda x: jnp.array(x, jnp.float32, copy=True), params)
        self.opt_spec = OptSpec(sft.lr, sft.warmup, sft.steps, sft.weight_decay, sft.clip_norm)
        self.opt_state = optimizer(self.opt_spec).init(self.trainable)
        self.step = 0
        lora_scale = self.scale if sft.lora_rank else None
        self._grad = functools.partial(_loss_and_grad, cfg=cfg, lora_scale=lora_scale, dtype=self.dtype.name)
        self._apply = functools.partial(_apply_update, spec=self.opt_spec)

    def batches(self, examples, pad_id: int):
        return data.endless_batches(examples, self.sft.batch_size, self.sft.seed, pad_id)

    def fit(self, examples: list[data.Example], pad_id: int = 0, ckpt_dir: str | Path | None = None,
            progress: bool = True, log: list | None = None):
        """Train to `sft.steps`, resuming from `ckpt_dir` if it holds a checkpoint of this run."""
        from tqdm.auto import tqdm
        sft = self.sft
        ckpt = None
        if ckpt_dir is not None:
            ckpt = RunCheckpoint(ckpt_dir, fingerprint(self.cfg.hf_config, dataclasses.asdict(sft), len(examples)))
            if (found := ckpt.restore(self._state())) is not None:
                self.step, state = found
                self.trainable, self.opt_state = state["trainable"], state["opt_state"]
        stream = self.batches(examples, pad_id)
        for _ in range(self.step * sft.grad_accum):  # replay the data order up to the resume point
            next(stream)
        bar = tqdm(total=sft.steps, initial=self.step, desc="sft", disable=not progress)
        while self.step < sft.steps:
            t0, grads, loss_sum, n_tok = time.perf_counter(), None, 0.0, 0
            for _ in range(sft.grad_accum):
                batch = next(stream)
                (loss, n), g = self._grad(self.trainable, self.frozen, batch)
                grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
                loss_sum, n_tok = loss_sum + loss, n_tok + n
            loss_val = float(loss_sum) / max(int(n_tok), 1)
            if not np.isfinite(loss_val):
                raise JmergeError(f"loss became {loss_val} at step {self.step}; the last good checkpoint is kept"
                                  + (f" in {ckpt_dir}" if ckpt_dir else ""))
            self.trainable, self.opt_state = self._apply(self.trainable, self.opt_state, grads, n_tok)
            self.step += 1
            dt = time.perf_counter() - t0
            if log is not None:
                log.append({"step": self.step, "loss": loss_val, "tokens": int(n_tok), "seconds": dt})
            bar.set_postfix(loss=f"{loss_val:.3f}", tok_s=f"{int(n_tok) / dt:.0f}")
            bar.update(1)
            if ckpt is not None and (self.step % sft.checkpoint_every == 0 or self.step == sft.steps):
                ckpt.save(self.step, self._state())
        bar.close()
        return self

    def _state(self) -> dict:
        return {"trainable": self.trainable, "opt_state": self.opt_state}

    def params(self):
        """The fine-tuned params in the dtype the base was given in."""
        if self.sft.lora_rank:
            return merge_lora(self.frozen, self.trainable, self.scale)
        return jax.tree.map(lambda t, f: t.astype(f.dtype), self.trainable, self.frozen)
