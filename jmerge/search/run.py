"""The main job: run the configured searches, build fixed-merge baselines, evaluate everything
with the same compiled programs, and write models, learnt parameters and one report.

Output directory:
    models/<name>/          merged HF directories (searched merges)
    params/<name>.json      learnt coefficients / weights; params/masks.safetensors (SOMF)
    checkpoints/<search>/   resumable state (kill -9 and rerun continues)
    report/                 report.json, report.md, safety_vs_domain.png, loss_curves.png
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jmerge import data
from jmerge.errors import JmergeError
from jmerge.search.config import SearchConfig
from jmerge.search.gradient import GradientSearch, SearchSpec, mixed_stream
from jmerge.search.merged import materialise, task_vectors
from jmerge.search.params import Coefficients, Masks, MethodParams, _paths
from jmerge.search.population import EvolveSpec, cocktail_weights, evolve, linear_merge
from jmerge.search.preference import Preference, encode_preferences, read_preferences

# Fixed-coefficient merges every report compares against (documented in the README).
BASELINE_SETTINGS = {
    "task_arithmetic": ("task_arithmetic", {"weight": 1.0}),
    "ties": ("ties", {"weight": 1.0, "density": 0.5}),
}


def _log(msg: str) -> None:
    print(f"[search] {msg}", flush=True)


class Job:
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
        self.results: dict[str, dict] = {}  # name -> {"params": pytree, "info": {...}}
        self.logs: dict[str, list] = {}

    # ----------------------------------------------------------------- searches
    def _spec(self, s: dict) -> SearchSpec:
        return SearchSpec(steps=s["steps"], lr=s["lr"], batch_size=s["batch_size"], seed=self.c.seed,
                          checkpoint_every=self.c.checkpoint_every, sparsity=s.get("sparsity", 0.0),
                          warmup=s.get("warmup", 0), objective=s.get("objective", "ce"), beta=s.get("beta", 0.1))

    def _fixed_batches(self, n: int, size: int) -> list[dict]:
        typed = {k: v for k, v in self.typed.items() if v[1] > 0}
        stream = mixed_stream(typed, size, self.c.seed + 17, self.pad_id)  # apart from training order
        return [next(stream) for _ in range(n)]

    def _preferences(self, s: dict):
        """(joined preference triples and weight or None, the DPO reference model or None, report
        info) of a gradient search: a dpo objective or a ce objective with a `prefer` type."""
        if s.get("objective", "ce") == "ce" and not s.get("prefer"):
            return None, None, {}
        reference = self.base if s["reference"] == "base" else self.experts[s["reference"]]
        info = dict(beta=s["beta"], reference=s["reference"])
        if s.get("prefer"):
            info["prefer"] = s["prefer"]
        return (self.preferences[s["prefer"]] if s.get("prefer") else None), reference, info

    def coefficients(self, s: dict) -> None:
        names = list(self.experts)
        modules = ()
        if s["granularity"] == "layer_module":
            modules = tuple(sorted({p[-2] for p in _paths(self.base["model"]["layers"])}))
        elif s["granularity"] != "layer":
            raise JmergeError(f"searches.coefficients.granularity must be layer or layer_module, not {s['granularity']!r}")
        param = Coefficients(k=len(names), modules=modules, transform=s["transform"], init=s["init"],
                             clamp=tuple(s["clamp"]))
        prefs, reference, extra = self._preferences(s)
        search = GradientSearch(self.model_cfg, self.base, list(self.experts.values()), param, self._spec(s),
                                param.theta0(self.model_cfg.num_layers), reference=reference)
        log = self.logs.setdefault("coefficients", [])
        search.fit(self.typed, self.pad_id, self.out / "checkpoints" / "coefficients", self.progress, log, prefs)
        info = dict(experts=names, **extra, **param.report(search.theta))
        self.results["searched:coefficients"] = dict(params=search.merged(), info=info)

    def masks(self, s: dict) -> None:
        safe = s["safe"] or next(iter(self.experts))
        others = [n for n in self.experts if n != safe]
        if not others:
            raise JmergeError("searches.masks needs at least one expert besides the safe model")
        kw = dict(k=len(others), lam=(float(s["lam"]),) * len(others), shared=s["shared"],
                  granularity=s["granularity"], temperature=s["temperature"], init=s["init"])
        param = Masks(**kw)
        safe_params = self.experts[safe]
        prefs, reference, extra = self._preferences(s)
        info = dict(safe=safe, experts=others, export=s["export"], objective=s["objective"], **extra)
        if s["objective"] == "dpo":
            typed = {s["data"]: self.preferences[s["data"]]}
        else:
            typed = self.typed if s["data"] is None else {s["data"]: self.typed[s["data"]]}
        search = GradientSearch(self.model_cfg, safe_params, [self.experts[n] for n in others], param,
                                self._spec(s), param.theta0(safe_params), reference=reference)
        log = self.logs.setdefault("masks", [])
        search.fit(typed, self.pad_id, self.out / "checkpoints" / "masks", self.progress, log, prefs)
        merged = search.merged(Masks(**kw, mode=s["export"]))
        self._save_masks(search.theta, param)
        keep = float(np.mean([float(jnp.mean(jax.nn.sigmoid(t))) for t in jax.tree.leaves(search.theta)]))
        self.results["searched:masks"] = dict(params=merged, info=dict(info, mean_keep_probability=keep))

    def evolve(self, s: dict) -> None:
        names = list(self.experts)
        init = {"weight": 1.0 / len(names), "density": 1.0, "t": 0.5, **s["init"]}
        param = MethodParams(s["method"], len(names), tuple(s["params"]), tuple(s["global_params"]))
        batches = self._fixed_batches(s["batches"], s["batch_size"])
        log = self.logs.setdefault("evolve", [])
        spec = EvolveSpec(generations=s["generations"], popsize=s["popsize"], sigma0=s["sigma0"], seed=self.c.seed)
        theta, best = evolve(self.model_cfg, self.base, list(self.experts.values()), param, init, batches, spec,
                             self.progress, log)
        tvs = task_vectors(self.base, list(self.experts.values()))
        merged = jax.jit(materialise, static_argnames=("param",))(self.base, tvs, theta, param=param,
                                                                   key=jax.random.PRNGKey(self.c.seed))
        info = dict(method=s["method"], experts=names, best_loss=best,
                    theta=jax.tree.map(lambda x: np.asarray(x).tolist(), theta))
        self.results[f"searched:evolve-{s['method']}"] = dict(params=merged, info=info)

    def cocktail(self, s: dict) -> None:
        names = list(self.experts)
        batches = self._fixed_batches(s["batches"], s["batch_size"])
        w, losses = cocktail_weights(self.model_cfg, list(self.experts.values()), batches, s["temperature"])
        merged = linear_merge(list(self.experts.values()), jnp.asarray(w, jnp.float32))
        self.results["searched:cocktail"] = dict(params=merged, info=dict(experts=names, weights=w.tolist(),
                                                                           losses=losses.tolist()))

    def sweep_points(self, s: dict) -> list[tuple[str, dict, dict]]:
        tvs = task_vectors(self.base, [self.experts[s["domain"]], self.experts[s["align"]]])
        param = Coefficients(k=2)
        make = jax.jit(materialise, static_argnames=("param",))
        points = []
        for a in s["alpha"]:
            for b in s["beta"]:
                theta = {"layers": jnp.broadcast_to(jnp.asarray([[a], [b]], jnp.float32), (self.model_cfg.num_layers, 2, 1)),
                         "rest": jnp.asarray([a, b], jnp.float32)}
                points.append((f"sweep:mergealign a={a:g} b={b:g}", make(self.base, tvs, theta, param=param),
                               dict(alpha=a, beta=b)))
        return points

    def baselines(self) -> list[tuple[str, dict, dict]]:
        out, names = [], list(self.experts)
        make = jax.jit(materialise, static_argnames=("param",))
        tvs = task_vectors(self.base, list(self.experts.values()))
        for b in self.c.baselines:
            if b == "mergealign":
                if len(names) != 2:
                    continue
                param = Coefficients(k=2)
                theta = {"layers": jnp.full((self.model_cfg.num_layers, 2, 1), 0.5), "rest": jnp.full((2,), 0.5)}
                out.append(("fixed:mergealign 0.5/0.5", make(self.base, tvs, theta, param=param), {}))
                continue
            method, values = BASELINE_SETTINGS[b]
            param = MethodParams(method, len(names), tuple(values))
            theta = param.theta0(self.model_cfg.num_layers, values)
            merged = make(self.base, tvs, theta, param=param, key=jax.random.PRNGKey(self.c.seed))
            out.append((f"fixed:{b}", merged, dict(values)))
        return out

    def _save_masks(self, theta, param: Masks) -> None:
        """Keep probabilities σ(logits) per HF tensor name (mask 0 when masks are shared), as
        float32 safetensors that the `somf` merge method reads (row masks have shape [out, 1])."""
        from jmerge.io.hf import host_array
        from jmerge.io.safetensors_io import write_file
        probs = param.probabilities(theta)
        items, arrays = [], []
        for part, stacked in (("layers", True), ("rest", False)):
            for j, tree in enumerate(probs[part]):
                for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
                    path = ".".join(k.key for k in p)
                    x = host_array(x).astype(np.float32)  # a gather every process joins
                    for i, slab in enumerate(x if stacked else [x]):
                        name = f"model.layers.{i}.{path}" if stacked else path
                        items.append((f"{j}/{name}" if len(probs[part]) > 1 else name, slab.dtype, slab.shape))
                        arrays.append(slab)
        if jax.process_index() != 0:
            return
        dest = self.out / "params"
        dest.mkdir(parents=True, exist_ok=True)
        write_file(dest / ".masks.safetensors.tmp", items, arrays, {"format": "jmerge-somf-mask"})
        (dest / ".masks.safetensors.tmp").replace(dest / "masks.safetensors")


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
    job = Job(cfg, progress)
    for name in ("coefficients", "masks", "evolve", "cocktail"):
        if name in cfg.searches:
            _log(f"search: {name}")
            getattr(job, name)(cfg.searches[name])
    models = [("base", job.base, {})] + [(f"expert:{n}", p, {}) for n, p in job.experts.items()]
    models += job.baselines()
    models += [(n, r["params"], r["info"]) for n, r in job.results.items()]
    if "sweep" in cfg.searches:
        models += job.sweep_points(cfg.searches["sweep"])
    report = evaluate(job, models, sets)
    report["settings"]["seconds"] = time.perf_counter() - t0
    write_outputs(job, report)
    return report


def eval_sets(ev: dict) -> tuple[dict, str | None, list]:
    """(prompt sets by suite, where the over-refusal prompts came from, domain tasks) of the
    config's eval section, read and cut to its limit."""
    from jmerge.eval import prompts as P
    from jmerge.eval import suites as S
    limit = ev["limit"]
    sets = {}
    if "safety" in ev["suites"]:
        sets["safety"] = S.harmful_prompts(ev["harmful"], ev["data"], limit)
    over_source = None
    if "overrefusal" in ev["suites"]:
        # XSTest's safe prompts when the data is there (dev data, not shipped); else `benign`.
        data_dir = ev["data"] or os.environ.get("JMERGE_DATA")
        try:
            xs, over_source = P.load_xstest(data_dir), "xstest"
        except JmergeError:
            if ev["benign"] is None:
                raise
            xs, over_source = _benign(ev["benign"]), str(ev["benign"])
        sets["overrefusal"] = S.safe_prompts(xs)[:limit]
    tasks = []
    if "domain" in ev["suites"]:
        if ev["domain"] is None:
            raise JmergeError("eval.domain: the domain suite needs a JSONL file of held-out items")
        task = S.load_domain(ev["domain"], ev["data"])
        tasks = [dataclasses.replace(task, items=task.items[:limit])]
    return sets, over_source, tasks


def evaluate(job: Job, models: list[tuple[str, dict, dict]], prepared: tuple) -> dict:
    """Every model through the eval suites with one Runtime: compiled once, params swapped.
    `prepared`: what `eval_sets` returned for the job's config."""
    from jmerge.eval import suites as S
    ev = job.c.eval
    sets, over_source, tasks = prepared
    rt = S.Runtime(job.model_cfg, job.base, job.tokenizer, mesh=job.mesh, max_new_tokens=ev["max_new_tokens"],
                   batch_size=ev["batch_size"], progress=False)
    from tqdm.auto import tqdm
    entries = []
    for name, params, info in tqdm(models, desc="evaluate", unit="model", disable=not job.progress):
        suites = {}
        if "safety" in sets:
            suites["safety"] = S.safety(params, rt, sets["safety"])
        if "overrefusal" in sets:
            suites["overrefusal"] = S.overrefusal(params, rt, sets["overrefusal"])
        if tasks:
            suites["domain"] = S.domain(params, rt, tasks)
        entries.append(dict(name=name, path=str(job.out / "models" / _slug(name)) if name.startswith("searched:") else "",
                            info=info, suites=suites))
    settings = dict(config=str(job.c.source), eval={k: str(v) for k, v in ev.items()}, overrefusal_set=over_source,
                    searches=job.c.searches, data={k: [str(v.path), v.weight, v.source] for k, v in job.c.data.items()})
    return dict(created=time.strftime("%Y-%m-%dT%H:%M:%S"), settings=settings, models=entries)


def _benign(spec) -> list:
    """`builtin`: the held-out part of the code-generated benign set (jmerge.synth), which the
    testbed trains on only through its train split; otherwise a prompt file."""
    from jmerge.eval import prompts as P
    if spec != "builtin":
        return P.load_prompts(str(spec))
    from jmerge.synth import benign_prompts
    texts = [t for t in benign_prompts() if P.in_test_split(t, 0.2)]
    return [P.Prompt(text=t, source="benign", id=f"benign:{i}") for i, t in enumerate(texts)]


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name.split(":", 1)[-1])


def search_inputs(cfg: SearchConfig) -> list:
    """Every path a search reads but its eval data directory: its output directory must not be,
    hold or lie inside any."""
    ev = [cfg.eval.get(k) for k in ("harmful", "domain", "benign")]
    return [cfg.source, cfg.base, *cfg.experts.values(), *(d.path for d in cfg.data.values()), *ev]


def write_outputs(job: Job, report: dict) -> None:
    from jmerge.eval.report import write_report
    from jmerge.io import hf
    from jmerge.io.atomic import atomic_dir, check_workspace
    out = check_workspace(job.out, search_inputs(job.c), data_dirs=[job.c.eval.get("data")])
    lead = jax.process_index() == 0  # every process joins the gathers of save_hf; one writes files
    (out / "models").mkdir(parents=True, exist_ok=True)
    (out / "params").mkdir(parents=True, exist_ok=True)
    for name, r in job.results.items():
        hf.save_hf(r["params"], job.model_cfg, out / "models" / _slug(name), force=True,
                   tokenizer_writer=job.write_tokenizer)
        if lead:
            (out / "params" / f"{_slug(name)}.json").write_text(json.dumps(r["info"], indent=1, default=float))
    if not lead:
        return
    with atomic_dir(out / "report", force=True, inputs=search_inputs(job.c),
                    data_dirs=[job.c.eval.get("data")]) as tmp:
        write_report(report, tmp)
        _loss_curves(job.logs, tmp / "loss_curves.png")


def _loss_curves(logs: dict[str, list], path: Path) -> None:
    curves = {k: v for k, v in logs.items() if v}
    if not curves:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(curves), figsize=(4.5 * len(curves), 3.4), squeeze=False)
    for ax, (name, rows) in zip(axes[0], curves.items()):
        if "loss" in rows[0]:
            ax.plot([r["step"] for r in rows], [r["loss"] for r in rows])
            ax.set_xlabel("step")
        else:
            ax.plot([r["generation"] for r in rows], [r["best"] for r in rows], label="best")
            ax.plot([r["generation"] for r in rows], [r["mean"] for r in rows], label="mean")
            ax.set_xlabel("generation")
            ax.legend()
        ax.set_title(name)
        ax.set_ylabel("objective")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
