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
from jmerge.objectives import token_logprobs
from jmerge.search.export import export, export_programs, park_abstract
from jmerge.search.merged import merged_hidden, task_vectors, weighted_ce, weighted_nll
from jmerge.search.parametrisations import Masks
from jmerge.search.preference import dpo_term, preference_batches, reference_logprobs

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


def _objective(out, batch, spec: SearchSpec):
    """`out`: the merged model's logits or `Hidden`; one projection serves both terms."""
    lp = token_logprobs(out, batch["input_ids"])
    if spec.objective == "dpo":
        return dpo_term(lp, batch, spec.beta)
    loss = weighted_nll(lp, batch)
    if "ref_logprob" in batch:  # a preference type joined: its rows are the batch's last
        loss = loss + batch["pref_weight"] * dpo_term(lp, batch, spec.beta)
    return loss


def _optimizer(spec: SearchSpec):
    sched = optax.warmup_cosine_decay_schedule(0.0, spec.lr, max(spec.warmup, 1), max(spec.steps, spec.warmup + 1)) \
        if spec.warmup else spec.lr
    return optax.adam(sched)


@functools.partial(jax.jit, static_argnames=("cfg", "param", "spec", "mesh"), donate_argnums=(0, 1))
def _step(theta, opt_state, base, tvs, batch, key, *, cfg, param, spec: SearchSpec, mesh=None):
    def loss_fn(theta):
        loss = _objective(merged_hidden(base, tvs, theta, cfg, batch, param, key=key, mesh=mesh), batch, spec)
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


@functools.partial(jax.jit, static_argnames=("cfg", "param", "mesh"))
def batch_loss(theta, base, tvs, batch, key, *, cfg, param, mesh=None):
    """The objective on one batch without gradients (scoring candidates, validation)."""
    return weighted_ce(merged_hidden(base, tvs, theta, cfg, batch, param, key=key, mesh=mesh), batch)


def _targets(rows) -> int:
    """Answer tokens that carry loss in a data type (so a run with cut answers is another run)."""
    return sum(int(r.loss_mask.sum()) for r in rows if hasattr(r, "loss_mask"))


def mesh_of(tree):
    """The mesh that a params pytree lives on; None for plain single-device arrays."""
    s = getattr(jax.tree.leaves(tree)[0], "sharding", None)
    return s.mesh if isinstance(s, NamedSharding) else None


def _global(x, sharding: NamedSharding):
    """A global array from a host copy that every process holds in full (each process builds only
    its addressable shards; in one process this is a plain device_put)."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def _padded(batch: dict, mesh, tail: int = 0) -> dict:
    """Host arrays with their rows padded to a multiple of data x fsdp: zero-weight rows (no loss,
    every token attended, so no row of attention is empty) inserted before the last `tail` rows,
    which stay last (the preference triples the objectives find there)."""
    rows = next(x.shape[0] for x in batch.values() if not isinstance(x, jax.Array) and np.ndim(x))
    pad = -rows % (mesh.shape["data"] * mesh.shape["fsdp"])

    def grow(name, x):
        if pad == 0 or isinstance(x, jax.Array) or not np.ndim(x):
            return x
        fill = np.full((pad,) + x.shape[1:], 1 if name == "attention_mask" else 0, x.dtype)
        return np.concatenate([x[:rows - tail], fill, x[rows - tail:]])
    return {k: grow(k, v) for k, v in batch.items()}


def _batch_sharding(x, mesh):
    return shd.batch_sharding(mesh, x.ndim) if np.ndim(x) else shd.replicated(mesh)


def place_batch(batch: dict, mesh, tail: int = 0, put=None):
    """Host arrays onto the mesh, rows padded (see `_padded`) and split over data x fsdp."""
    if mesh is None:
        return batch if put is None else {k: put(v, None) for k, v in batch.items()}
    put = put or _global
    return {k: v if isinstance(v, jax.Array) else put(v, _batch_sharding(v, mesh))
            for k, v in _padded(batch, mesh, tail).items()}


def step_batch(batch: dict, mesh, spec: SearchSpec, reference, put=None) -> dict:
    """A host batch as the step takes it: placed on the mesh (`put(host array, sharding)`,
    default `_global`), and with the DPO reference's log-probabilities of its triples (the whole
    batch for the dpo objective, the last 2·batch_size rows for a joined type) from
    `reference(placed triple rows, their count)`."""
    rows = batch["input_ids"].shape[0]
    tail = rows if spec.objective == "dpo" else 2 * spec.batch_size if "pref_weight" in batch else 0
    placed = place_batch(batch, mesh, tail, put)
    if tail:
        triples = {k: batch[k][-tail:] for k in ("input_ids", "attention_mask", "loss_mask")}
        placed["ref_logprob"] = reference(place_batch(triples, mesh, tail, put), tail)
    return placed


@functools.lru_cache(maxsize=8)
def _replicator(mesh):
    return jax.jit(lambda x: x, out_shardings=shd.replicated(mesh))


def _theta_sharding(t, mesh):
    """Leaves already on the mesh (mask logits shaped like the params) stay; the rest (small
    coefficient arrays) are replicated over it, so checkpoints restore onto the same layout."""
    where = getattr(t, "sharding", None)
    return where if isinstance(where, NamedSharding) and where.mesh == mesh else shd.replicated(mesh)


def place_theta(theta, mesh):
    """Theta's leaves onto the mesh (see `_theta_sharding`)."""
    if mesh is None:
        return theta

    def put(t):
        where = _theta_sharding(t, mesh)
        return t if where is getattr(t, "sharding", None) else _global(jax.device_get(t), where)
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
        self.mesh = mesh_of(base)
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
        def reference(ref_batch, rows):
            lp = reference_logprobs(self.reference, ref_batch, cfg=self.cfg, rows=rows)
            return lp if self.mesh is None else _replicator(self.mesh)(lp)
        return step_batch(batch, self.mesh, self.spec, reference)

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
                                           param=self.param, spec=self.spec, mesh=self.mesh)
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
        return export(self.base, self.tvs, self.theta, param, key)


def search_programs(cfg, base, experts, param, spec: SearchSpec, rows: int, length: int,
                    reference=None) -> dict[str, jax.stages.Lowered]:
    """Every program a gradient search compiles (`GradientSearch` and `merged`), lowered from
    abstract inputs through the same jitted functions and placement rules as a real run: `base`,
    `experts` and `reference` (the DPO reference model: the dpo objective, or a ce objective with
    a joined preference type) are pytrees of jax.ShapeDtypeStruct laid out as the run lays them
    out (`sharding.param_shardings`); `rows` x `length` is one step's batch (a joined type's
    2·batch_size triple rows included). Keys: reference (when one is given), step,
    export:layers and export:rest (`export.export` of `param` itself; an export's mask
    mode changes no shape)."""
    mesh = mesh_of(base)

    def put(x, sharding):
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)
    replicated = None if mesh is None else shd.replicated(mesh)
    tvs = task_vectors(base, experts)
    theta = param.layout(base) if isinstance(param, Masks) else jax.eval_shape(lambda: param.theta0(cfg.num_layers))
    theta = theta if mesh is None else jax.tree.map(lambda t: put(t, _theta_sharding(t, mesh)), theta)
    opt = _optimizer(spec)
    opt_state = optax.tree_map_params(opt, lambda s, t: put(s, t.sharding), jax.eval_shape(opt.init, theta), theta,
                                      transform_non_params=lambda s: put(s, replicated))
    host = {k: np.zeros((rows, length), np.int32) for k in ("input_ids", "attention_mask", "loss_mask")}
    if spec.objective == "ce":
        host["weight"] = np.zeros((rows, length), np.float32)
        if reference is not None:
            host["pref_weight"] = np.float32(0)
    programs = {}

    def lower_reference(triples, n):
        programs["reference"] = reference_logprobs.lower(reference, triples, cfg=cfg, rows=n)
        return jax.ShapeDtypeStruct((n,), jnp.float32, sharding=replicated)
    batch = step_batch(host, mesh, spec, lower_reference, put)
    key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated)
    programs["step"] = _step.lower(theta, opt_state, base, tvs, batch, key, cfg=cfg, param=param, spec=spec, mesh=mesh)
    # A run exports after parking the models (`SearchRun.park`): the dry run lowers it so too.
    parked = park_abstract((base, experts))
    programs.update(export_programs(parked[0], task_vectors(*parked), theta, param, key))
    return programs
