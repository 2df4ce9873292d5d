"""Gradient search over a merge parametrisation (coefficients or masks) on typed data.

Objective `ce` (One Bad Model): Σ_type w_type · CE(response | prompt) over, e.g., safety pairs and
domain pairs — each type's CE is a mean over its response tokens. Every step mixes one batch of
each type into one forward pass; the per-token weights carry w_type / n_tokens_type.
Objective `dpo` (SOMF's): DPO on (prompt, chosen, rejected) triples, the merged model as the
policy against a fixed reference model (see `preference.py`).
Both at once: the `ce` objective plus w_pref · DPO on one preference type, whose triples ride as
the last rows of the same batch (CE weight 0, see `mixed_stream`), so one forward pass serves both.

Multi-process runs: every process draws the same global batch from the same seeded stream and
builds only its addressable shards of it; the learnt state lives on the params' mesh.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding

from jmerge import data
from jmerge import sharding as shd
from jmerge.checkpoint import RunCheckpoint, fingerprint
from jmerge.errors import JmergeError
from jmerge.search.merged import materialise, merged_forward, task_vectors, weighted_ce
from jmerge.search.parametrisations import Masks
from jmerge.search.preference import dpo_objective, preference_batches, reference_logprobs

OBJECTIVES = ("ce", "dpo")


@dataclasses.dataclass(frozen=True)
class SearchSpec:
    steps: int = 50
    lr: float = 1e-2
    batch_size: int = 4  # rows per data type per step
    seed: int = 0
    checkpoint_every: int = 10
    sparsity: float = 0.0  # masks: penalty on the mean keep probability
    warmup: int = 0
    objective: str = "ce"  # or "dpo"
    beta: float = 0.1  # dpo: strength of the implicit KL to the reference


def mixed_batch(parts: list[tuple[dict, float]], pad_id: int = 0) -> dict:
    """Rows of every type in one [B, T] batch; weight = loss_mask · w_type / n_tokens_type."""
    length = max(b["input_ids"].shape[1] for b, _ in parts)
    out = {k: [] for k in ("input_ids", "attention_mask", "loss_mask", "weight")}
    for b, w in parts:
        pad = ((0, 0), (0, length - b["input_ids"].shape[1]))
        out["input_ids"].append(np.pad(b["input_ids"], pad, constant_values=pad_id))
        out["attention_mask"].append(np.pad(b["attention_mask"], pad))
        lm = np.pad(b["loss_mask"], pad)
        out["loss_mask"].append(lm)
        out["weight"].append(lm * (w / max(int(lm.sum()), 1)))
    return {k: np.concatenate(v).astype(np.float32 if k == "weight" else np.int32) for k, v in out.items()}


def mixed_stream(typed: dict[str, tuple[list[data.Example], float]], batch_size: int, seed: int,
                 pad_id: int = 0, prefs=None):
    """One deterministic endless stream per data type, zipped into mixed batches.

    `prefs`: (an endless stream of preference batches, w): each batch's triples join as its last
    rows with no CE weight, and w rides along as `pref_weight`, the DPO term's weight."""
    its = [(data.endless_batches(exs, batch_size, seed * 1000 + i, pad_id), w)
           for i, (exs, w) in enumerate(typed.values())]
    if prefs is not None:
        its.append((prefs[0], 0.0))
    while True:
        batch = mixed_batch([(next(it), w) for it, w in its], pad_id)
        if prefs is not None:
            batch["pref_weight"] = np.float32(prefs[1])
        yield batch


def _objective(logits, batch, spec: SearchSpec):
    if spec.objective == "dpo":
        return dpo_objective(logits, batch, spec.beta)
    loss = weighted_ce(logits, batch)
    if "ref_logprob" in batch:  # a preference type joined: its rows are the batch's last
        n = batch["ref_logprob"].shape[0]
        tail = {"input_ids": batch["input_ids"][-n:], "loss_mask": batch["loss_mask"][-n:],
                "ref_logprob": batch["ref_logprob"]}
        loss = loss + batch["pref_weight"] * dpo_objective(logits[-n:], tail, spec.beta)
    return loss


def _optimizer(spec: SearchSpec):
    sched = optax.warmup_cosine_decay_schedule(0.0, spec.lr, max(spec.warmup, 1), max(spec.steps, spec.warmup + 1)) \
        if spec.warmup else spec.lr
    return optax.adam(sched)


@functools.partial(jax.jit, static_argnames=("cfg", "param", "spec"), donate_argnums=(0, 1))
def _step(theta, opt_state, base, tvs, batch, key, *, cfg, param, spec: SearchSpec):
    def loss_fn(theta):
        logits = merged_forward(base, tvs, theta, cfg, batch, param, key=key)
        loss = _objective(logits, batch, spec)
        if isinstance(param, Masks) and spec.sparsity:
            probs = jax.tree.leaves(jax.tree.map(lambda t: jnp.mean(jax.nn.sigmoid(t)), theta))
            loss = loss + spec.sparsity * sum(probs) / len(probs)
        return loss
    loss, grads = jax.value_and_grad(loss_fn)(theta)
    updates, opt_state = _optimizer(spec).update(grads, opt_state, theta)
    theta = optax.apply_updates(theta, updates)
    if hasattr(param, "project"):
        theta = param.project(theta)
    return theta, opt_state, loss


@functools.partial(jax.jit, static_argnames=("cfg", "param"))
def batch_loss(theta, base, tvs, batch, key, *, cfg, param):
    """The objective on one batch without gradients (scoring candidates, validation)."""
    return weighted_ce(merged_forward(base, tvs, theta, cfg, batch, param, key=key), batch)


def _targets(rows) -> int:
    """Answer tokens that carry loss in a data type (so a run with cut answers is another run)."""
    return sum(int(r.loss_mask.sum()) for r in rows if hasattr(r, "loss_mask"))


def _mesh(tree):
    """The mesh that a params pytree lives on; None for plain single-device arrays."""
    s = getattr(jax.tree.leaves(tree)[0], "sharding", None)
    return s.mesh if isinstance(s, NamedSharding) else None


def _global(x, sharding: NamedSharding):
    """A global array from a host copy that every process holds in full (each process builds only
    its addressable shards; in one process this is a plain device_put)."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def place_batch(batch: dict, mesh):
    """Host arrays onto the mesh, rows split over data x fsdp when they divide (else replicated)."""
    if mesh is None:
        return batch
    rows = mesh.shape["data"] * mesh.shape["fsdp"]

    def put(x):
        if isinstance(x, jax.Array):
            return x
        split = x.ndim and x.shape[0] % rows == 0
        return _global(x, shd.batch_sharding(mesh, x.ndim) if split else shd.replicated(mesh))
    return {k: put(v) for k, v in batch.items()}


def place_theta(theta, mesh):
    """Leaves already on the mesh (mask logits shaped like the params) stay; the rest (small
    coefficient arrays) are replicated over it, so checkpoints restore onto the same layout."""
    if mesh is None:
        return theta

    def put(t):
        if isinstance(getattr(t, "sharding", None), NamedSharding) and t.sharding.mesh == mesh:
            return t
        return _global(jax.device_get(t), shd.replicated(mesh))
    return jax.tree.map(put, theta)


class GradientSearch:
    """`reference`: the fixed model of a DPO term (its logprobs are taken once per batch, without
    gradients)."""

    def __init__(self, cfg, base, experts, param, spec: SearchSpec, theta0, reference=None):
        if spec.steps <= 0 or spec.batch_size <= 0:
            raise JmergeError("search steps and batch_size must be positive")
        if spec.objective not in OBJECTIVES:
            raise JmergeError(f"unknown search objective {spec.objective!r}; known: {', '.join(OBJECTIVES)}")
        if spec.objective == "dpo" and not spec.beta > 0:
            raise JmergeError(f"dpo beta must be positive (got {spec.beta})")
        if spec.objective == "dpo" and reference is None:
            raise JmergeError("the dpo objective needs a reference model")
        self.prefs = None  # (preference triples, weight) joined to a ce objective, set by fit
        self.cfg, self.base, self.param, self.spec, self.reference = cfg, base, param, spec, reference
        self.mesh = _mesh(base)
        self.tvs = task_vectors(base, experts)
        self.theta = place_theta(theta0, self.mesh)
        # on the mesh like theta (optax's step count is made uncommitted): else step 2 recompiles
        self.opt_state = place_theta(_optimizer(spec).init(self.theta), self.mesh)
        self.step = 0

    def _state(self):
        return {"theta": self.theta, "opt_state": self.opt_state}

    def streams(self, typed: dict[str, tuple[list, float]], pad_id: int):
        if self.spec.objective == "dpo":
            if len(typed) != 1:
                raise JmergeError(f"the dpo objective takes one preference data type, not {len(typed)}")
            (prefs, _), = typed.values()
            return preference_batches(prefs, self.spec.batch_size, self.spec.seed, pad_id)
        joined = None
        if self.prefs is not None:
            prefs, w = self.prefs
            joined = (preference_batches(prefs, self.spec.batch_size, self.spec.seed + 1, pad_id), w)
        return mixed_stream(typed, self.spec.batch_size, self.spec.seed, pad_id, joined)

    def _device_batch(self, batch: dict) -> dict:
        if self.spec.objective == "dpo":
            batch = place_batch(batch, self.mesh)
            batch["ref_logprob"] = reference_logprobs(self.reference, batch, cfg=self.cfg)
        elif "pref_weight" in batch:
            n = 2 * self.spec.batch_size
            tail = place_batch({k: batch[k][-n:] for k in ("input_ids", "attention_mask", "loss_mask")}, self.mesh)
            batch = place_batch(batch, self.mesh)
            batch["ref_logprob"] = reference_logprobs(self.reference, tail, cfg=self.cfg)
        else:
            batch = place_batch(batch, self.mesh)
        return batch

    def fit(self, typed, pad_id=0, ckpt_dir: str | Path | None = None, progress=True, log=None, prefs=None):
        """`prefs`: (preference triples, weight), a DPO term joined to the ce objective."""
        from tqdm.auto import tqdm
        if prefs is not None:
            if self.spec.objective != "ce":
                raise JmergeError("a preference type joins the ce objective only")
            if self.reference is None:
                raise JmergeError("a preference type needs a reference model")
            if not prefs[0]:
                raise JmergeError("the preference data type is empty")
            self.prefs = prefs
        if not typed or all(len(exs) == 0 for exs, _ in typed.values()):
            raise JmergeError("search needs data: every data type is empty")
        if self.spec.objective == "ce" and sum(w for _, w in typed.values()) == 0:
            raise JmergeError("data type weights sum to 0")
        ckpt = None
        if ckpt_dir is not None:
            parts = [self.cfg.hf_config, dataclasses.asdict(self.spec), repr(self.param),
                     {k: (len(e), _targets(e), w) for k, (e, w) in typed.items()}]
            if prefs is not None:
                parts.append((len(prefs[0]), prefs[1], _targets([x for p in prefs[0] for x in (p.chosen, p.rejected)])))
            fp = fingerprint(*parts)
            ckpt = RunCheckpoint(ckpt_dir, fp)
            if (found := ckpt.restore(self._state())) is not None:
                self.step, st = found
                self.theta, self.opt_state = st["theta"], st["opt_state"]
        stream = self.streams(typed, pad_id)
        for _ in range(self.step):
            next(stream)
        key0 = jax.random.PRNGKey(self.spec.seed)
        bar = tqdm(total=self.spec.steps, initial=self.step, desc="search", disable=not progress)
        while self.step < self.spec.steps:
            t0 = time.perf_counter()
            batch = self._device_batch(next(stream))
            theta, opt_state, loss = _step(self.theta, self.opt_state, self.base, self.tvs, batch,
                                           jax.random.fold_in(key0, self.step), cfg=self.cfg,
                                           param=self.param, spec=self.spec)
            loss = float(loss)
            if not np.isfinite(loss):
                where = f"; the last good checkpoint is in {ckpt_dir}" if ckpt_dir else ""
                raise JmergeError(f"search loss became {loss} at step {self.step}{where}")
            self.theta, self.opt_state = theta, opt_state
            self.step += 1
            if log is not None:
                log.append({"step": self.step, "loss": loss, "seconds": time.perf_counter() - t0})
            bar.set_postfix(loss=f"{loss:.4f}")
            bar.update(1)
            if ckpt is not None and (self.step % self.spec.checkpoint_every == 0 or self.step == self.spec.steps):
                ckpt.save(self.step, self._state())
        bar.close()
        return self

    def merged(self, param=None, seed: int | None = None):
        """The merged params (for masks, pass the export parametrisation: soft/threshold/sample)."""
        param = param or self.param
        key = jax.random.PRNGKey(self.spec.seed if seed is None else seed)
        return jax.jit(materialise, static_argnames=("param",))(self.base, self.tvs, self.theta, param=param, key=key)
