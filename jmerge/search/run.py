"""The main job: run the configured searches, build fixed-merge baselines, evaluate everything
with the same compiled programs (`jmerge.search.evaluation`), and write models, learnt
parameters and one report (`jmerge.search.outputs`, which also lays out the output directory).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import itertools
import time
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jmerge import data
from jmerge.errors import JmergeError
from jmerge.search.evaluation import eval_sets, evaluate
from jmerge.search.gradient import GradientSearch, SearchSpec, mixed_stream
from jmerge.search.export import export, on_device, park
from jmerge.search.merged import task_vectors
from jmerge.search.outputs import open_outputs, save_masks, save_searched, write_outputs
from jmerge.search.parametrisations import Coefficients, Masks, MethodSettings, _paths
from jmerge.search.population import EvolveSpec, cocktail_weights, evolve, linear_merge
from jmerge.search.preference import Preference, encode_preferences, read_preferences
from jmerge.search.settings import (ROLE_BASELINES, CocktailSearch, CoefficientSearch, EvolveSearch, MaskSearch,
                                    SearchConfig, SweepSearch)

# Fixed-coefficient merges every report compares against (documented in the README).
BASELINE_SETTINGS = {
    "task_arithmetic": ("task_arithmetic", {"weight": 1.0}),
    "ties": ("ties", {"weight": 1.0, "density": 0.5}),
    "resta": ("resta", {"gamma": 1.0, "density": 1.0}),
    "safe_lora": ("safe_lora", {"threshold": 0.5}),
    "safemerge": ("safemerge", {"threshold": 0.7, "weight": 0.5}),
}


def baseline_experts(c: SearchConfig, name: str) -> list[str]:
    """The experts a baseline merges, in the order its method takes them."""
    if name not in ROLE_BASELINES:
        return list(c.experts)
    s = c.searches.get("sweep") or SweepSearch()
    return [s.domain, s.align]


def baseline_param(name: str, k: int, num_layers: int) -> tuple[MethodSettings, dict]:
    """The fixed settings of baseline `name` over k experts, and their theta."""
    from jmerge.merge import registry
    method, values = BASELINE_SETTINGS[name]
    m = registry.get(method)
    param = MethodSettings(method, k, tuple(v for v in values if m.params[v].per_model),
                           tuple(v for v in values if not m.params[v].per_model))
    return param, param.theta0(num_layers, values)


def _log(msg: str) -> None:
    print(f"[search] {msg}", flush=True)


def search_spec(c: SearchConfig, s: CoefficientSearch | MaskSearch, sparsity: float = 0.0,
                objective: str = "ce") -> SearchSpec:
    """A gradient search's training settings from its config section."""
    return SearchSpec(steps=s.steps, lr=s.lr, batch_size=s.batch_size, seed=c.seed,
                      checkpoint_every=c.checkpoint_every, sparsity=sparsity, warmup=s.warmup,
                      objective=objective, beta=s.beta)


def coefficient_param(s: CoefficientSearch, k: int, base) -> Coefficients:
    """The coefficient parametrisation of `searches.coefficients` over K task vectors; `base`
    (arrays or abstract) names the modules of a per-module λ."""
    modules = ()
    if s.granularity == "layer_module":
        modules = tuple(sorted({p[-2] for p in _paths(base["model"]["layers"])}))
    elif s.granularity != "layer":
        raise JmergeError(f"searches.coefficients.granularity must be layer or layer_module, not {s.granularity!r}")
    return Coefficients(k=k, modules=modules, transform=s.transform, init=s.init, clamp=tuple(s.clamp))


def mask_param(s: MaskSearch, k: int) -> Masks:
    """The training parametrisation of `searches.masks` over K task vectors (export: its `mode`
    replaced by `s.export`)."""
    return Masks(k=k, lam=(float(s.lam),) * k, shared=s.shared, granularity=s.granularity,
                 temperature=s.temperature, init=s.init)


def evolve_param(s: EvolveSearch, k: int) -> tuple[MethodSettings, dict[str, float]]:
    """The per-layer method settings `searches.evolve` searches over K experts, and their start."""
    init = {"weight": 1.0 / k, "density": 1.0, "t": 0.5, **s.init}
    return MethodSettings(s.method, k, tuple(s.params), tuple(s.global_params)), init


class SearchRun:
    """The whole search job: the config, the models and data it loaded onto the mesh, and what
    each search found (`results`, `logs`)."""

    def __init__(self, cfg: SearchConfig, progress: bool = True):
        from jmerge import sharding
        from jmerge.generate import load_tokenizer
        from jmerge.io import load_model
        self.c, self.progress = cfg, progress
        # Every data file read (and checked) before any model is loaded: a bad row fails fast.
        rows = {name: _select(read_preferences(spec.path) if name in cfg.preference_data
                              else data.read_pairs(spec.path), spec, name)
                for name, spec in cfg.data.items()}
        self.mesh = sharding.make_mesh(cfg.mesh)
        dtype = jnp.dtype(cfg.dtype)
        _log(f"loading base {cfg.base} and {len(cfg.experts)} experts")
        base = load_model(cfg.base, mesh=self.mesh, dtype=dtype)
        self.model_cfg, self.base = base.cfg, base.params
        self.write_tokenizer = base.write_tokenizer
        self.experts = {}
        for name, path in cfg.experts.items():
            m = load_model(path, mesh=self.mesh, dtype=dtype)
            if jax.tree.structure(m.params) != jax.tree.structure(self.base) or any(
                    a.shape != b.shape for a, b in zip(jax.tree.leaves(m.params), jax.tree.leaves(self.base))):
                raise JmergeError(f"expert {name} ({path}) has another architecture or shape than the base")
            self.experts[name] = m.params
        self.tokenizer = load_tokenizer(cfg.base)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.typed, self.preferences = {}, {}  # CE pairs; (prompt, chosen, rejected) triples
        for name, spec in cfg.data.items():
            if name in cfg.preference_data:
                prefs = encode_preferences(self.tokenizer, rows[name], cfg.max_len)
                if spec.tokens:
                    prefs = [Preference(*_opening([p.chosen, p.rejected], spec.tokens)) for p in prefs]
                self.preferences[name] = (prefs, spec.weight)
            else:
                exs = data.encode_pairs(self.tokenizer, rows[name], cfg.max_len)
                self.typed[name] = (_opening(exs, spec.tokens) if spec.tokens else exs, spec.weight)
        self.out = cfg.out
        # name -> {"make": () -> the merged params, "info": {...}}: made when evaluated
        self.results: dict[str, dict] = {}
        self.logs: dict[str, list] = {}

    def park(self) -> None:
        """The base and the experts to host memory: what follows the searches only merges them
        (`export`) and evaluates one model at a time on the devices."""
        self.base = park(self.base)
        self.experts = {n: park(p) for n, p in self.experts.items()}

    def _export(self, base: str | None, experts: list[str], theta, param, seed: int | None):
        """A merge of the job's models (`base`: None for the base, else an expert's name), made
        when called, from wherever the models are then."""
        def make():
            b = self.base if base is None else self.experts[base]
            key = None if seed is None else jax.random.PRNGKey(seed)
            return export(b, task_vectors(b, [self.experts[n] for n in experts]), theta, param, key)
        return make

    # ----------------------------------------------------------------- searches

    def _fixed_batches(self, n: int, size: int) -> list[dict]:
        typed = {k: v for k, v in self.typed.items() if v[1] > 0}
        stream = mixed_stream(typed, size, self.c.seed + 17, self.pad_id)  # apart from training order
        return [next(stream) for _ in range(n)]

    def _preferences(self, s: CoefficientSearch | MaskSearch, objective: str = "ce"):
        """(joined preference triples and weight or None, the DPO reference model or None, report
        info) of a gradient search: a dpo objective or a ce objective with a `prefer` type."""
        if objective == "ce" and not s.prefer:
            return None, None, {}
        reference = self.base if s.reference == "base" else self.experts[s.reference]
        info = dict(beta=s.beta, reference=s.reference)
        if s.prefer:
            info["prefer"] = s.prefer
        return (self.preferences[s.prefer] if s.prefer else None), reference, info

    def coefficients(self, s: CoefficientSearch) -> None:
        names = list(self.experts)
        param = coefficient_param(s, len(names), self.base)
        prefs, reference, extra = self._preferences(s)
        search = GradientSearch(self.model_cfg, self.base, list(self.experts.values()), param, search_spec(self.c, s),
                                param.theta0(self.model_cfg.num_layers), reference=reference)
        log = self.logs.setdefault("coefficients", [])
        search.fit(self.typed, self.pad_id, self.out / "checkpoints" / "coefficients", self.progress, log, prefs)
        info = dict(experts=names, **extra, **param.report(search.theta))
        self.results["searched:coefficients"] = dict(
            make=self._export(None, names, search.theta, param, search.spec.seed), info=info)

    def masks(self, s: MaskSearch) -> None:
        safe = s.safe or next(iter(self.experts))
        others = [n for n in self.experts if n != safe]
        if not others:
            raise JmergeError("searches.masks needs at least one expert besides the safe model")
        param = mask_param(s, len(others))
        safe_params = self.experts[safe]
        prefs, reference, extra = self._preferences(s, s.objective)
        info = dict(safe=safe, experts=others, export=s.export, objective=s.objective, **extra)
        if s.objective == "dpo":
            typed = {s.data: self.preferences[s.data]}
        else:
            typed = self.typed if s.data is None else {s.data: self.typed[s.data]}
        search = GradientSearch(self.model_cfg, safe_params, [self.experts[n] for n in others], param,
                                search_spec(self.c, s, s.sparsity, s.objective), param.theta0(safe_params),
                                reference=reference)
        log = self.logs.setdefault("masks", [])
        search.fit(typed, self.pad_id, self.out / "checkpoints" / "masks", self.progress, log, prefs)
        save_masks(self.out, search.theta, param)
        keep = float(np.mean([float(jnp.mean(jax.nn.sigmoid(t))) for t in jax.tree.leaves(search.theta)]))
        make = self._export(safe, others, search.theta, dataclasses.replace(param, mode=s.export), search.spec.seed)
        self.results["searched:masks"] = dict(make=make, info=dict(info, mean_keep_probability=keep))

    def evolve(self, s: EvolveSearch) -> None:
        names = list(self.experts)
        param, init = evolve_param(s, len(names))
        batches = self._fixed_batches(s.batches, s.batch_size)
        log = self.logs.setdefault("evolve", [])
        spec = EvolveSpec(generations=s.generations, popsize=s.popsize, sigma0=s.sigma0, seed=self.c.seed)
        theta, best = evolve(self.model_cfg, self.base, list(self.experts.values()), param, init, batches, spec,
                             self.progress, log)
        info = dict(method=s.method, experts=names, best_loss=best,
                    theta=jax.tree.map(lambda x: np.asarray(x).tolist(), theta))
        self.results[f"searched:evolve-{s.method}"] = dict(make=self._export(None, names, theta, param, self.c.seed),
                                                           info=info)

    def cocktail(self, s: CocktailSearch) -> None:
        names = list(self.experts)
        batches = self._fixed_batches(s.batches, s.batch_size)
        w, losses = cocktail_weights(self.model_cfg, list(self.experts.values()), batches, s.temperature)
        merged = park(linear_merge(list(self.experts.values()), jnp.asarray(w, jnp.float32)))
        self.results["searched:cocktail"] = dict(make=lambda: on_device(merged), info=dict(
            experts=names, weights=w.tolist(), losses=losses.tolist()))

    # Sweep points and baselines are generators: each merge is made when the evaluation asks for
    # it and let go after its suites, so one of them is in memory at a time.
    def sweep_points(self, s: SweepSearch) -> Iterator[tuple[str, dict, dict]]:
        param = Coefficients(k=2)
        for a in s.alpha:
            for b in s.beta:
                theta = {"layers": jnp.broadcast_to(jnp.asarray([[a], [b]], jnp.float32), (self.model_cfg.num_layers, 2, 1)),
                         "rest": jnp.asarray([a, b], jnp.float32)}
                yield (f"sweep:mergealign a={a:g} b={b:g}", self._export(None, [s.domain, s.align], theta, param, None)(),
                       dict(alpha=a, beta=b))

    def baselines(self) -> Iterator[tuple[str, dict, dict]]:
        names = list(self.experts)
        for b in self.c.baselines:
            if b == "mergealign":
                if len(names) != 2:
                    continue
                param = Coefficients(k=2)
                theta = {"layers": jnp.full((self.model_cfg.num_layers, 2, 1), 0.5), "rest": jnp.full((2,), 0.5)}
                yield "fixed:mergealign 0.5/0.5", self._export(None, names, theta, param, None)(), {}
                continue
            order = baseline_experts(self.c, b)
            param, theta = baseline_param(b, len(order), self.model_cfg.num_layers)
            yield f"fixed:{b}", self._export(None, order, theta, param, self.c.seed)(), dict(BASELINE_SETTINGS[b][1])


def _select(rows: list[dict], spec, name: str) -> list[dict]:
    """The rows whose "source" matches the type's glob (all rows without one)."""
    if spec.source is None:
        return rows
    kept = [r for r in rows if fnmatch.fnmatchcase(str(r.get("source", "")), spec.source)]
    if not kept:
        found = sorted({str(r.get("source", "")) for r in rows})[:8]
        raise JmergeError(f"data.{name}: no row of {spec.path} has a source matching {spec.source!r} "
                          f"(sources there: {', '.join(found) or 'none'})")
    return kept


def _opening(exs: list[data.Example], n: int) -> list[data.Example]:
    """Each example cut after its first n answer tokens (shorter rows also make cheaper steps)."""
    out = []
    for ex in exs:
        end = int(np.argmax(ex.loss_mask)) + n
        out.append(data.Example(ex.ids[:end], ex.loss_mask[:end]))
    return out


def run(cfg: SearchConfig, progress: bool = True) -> dict:
    """Everything the config asks for; returns the report dict."""
    t0 = time.perf_counter()
    sets = eval_sets(cfg.eval)  # a bad prompt file fails before the models load, not after the searches
    job = SearchRun(cfg, progress)
    for name in ("coefficients", "masks", "evolve", "cocktail"):
        if name in cfg.searches:
            _log(f"search: {name}")
            getattr(job, name)(cfg.searches[name])
    out = open_outputs(job)
    job.park()
    held = [("base", job.base, {})] + [(f"expert:{n}", p, {}) for n, p in job.experts.items()]
    searched = ((n, r["make"](), r["info"]) for n, r in job.results.items())
    sweep = job.sweep_points(cfg.searches["sweep"]) if "sweep" in cfg.searches else []
    report = evaluate(job, itertools.chain(held, job.baselines(), searched, sweep), sets,
                      keep=lambda name, params, info: save_searched(job, out, name, params, info))
    report["settings"]["seconds"] = time.perf_counter() - t0
    write_outputs(job, out, report)
    return report
