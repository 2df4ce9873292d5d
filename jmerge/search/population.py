"""Gradient-free searches: CMA-ES over per-layer merge parameters (EvoMM) and LM-Cocktail.

Candidates are scored in memory by the same objective as the gradient search — the merged model
is built inside the graph from jit arguments, so no checkpoint is written and nothing recompiles
per candidate.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np

from jmerge.errors import JmergeError
from jmerge.objectives import hidden
from jmerge.search.gradient import batch_loss, mesh_of
from jmerge.search.merged import task_vectors, weighted_ce
from jmerge.search.parametrisations import MethodSettings


@dataclasses.dataclass(frozen=True)
class EvolveSpec:
    generations: int = 10
    popsize: int | None = None  # default: CMA's 4 + 3 ln(n)
    sigma0: float = 1 / 6  # as in mergekit-evolve
    seed: int = 0
    bounds: tuple[float, float] = (0.0, 1.0)


def evolve(cfg, base, experts, param: MethodSettings, init: dict[str, float], batches: list[dict],
           spec: EvolveSpec, progress=True, log: list | None = None):
    """CMA-ES minimising the summed objective over fixed `batches`. Returns (best theta, loss)."""
    import cma
    from tqdm.auto import tqdm
    tvs, mesh = task_vectors(base, experts), mesh_of(base)
    theta0 = param.theta0(cfg.num_layers, init)
    flat0, unflatten = jax.flatten_util.ravel_pytree(theta0)
    key = jax.random.PRNGKey(spec.seed)

    def score(flat):
        theta = unflatten(jnp.asarray(flat, jnp.float32))
        return sum(float(batch_loss(theta, base, tvs, b, key, cfg=cfg, param=param, mesh=mesh)) for b in batches)

    opts = {"seed": spec.seed + 1, "bounds": list(spec.bounds), "verbose": -9}
    if spec.popsize:
        opts["popsize"] = spec.popsize
    es = cma.CMAEvolutionStrategy(np.asarray(flat0, np.float64), spec.sigma0, opts)
    best, best_loss = np.asarray(flat0), score(flat0)
    bar = tqdm(total=spec.generations, desc="evolve", disable=not progress)
    for g in range(spec.generations):
        t0 = time.perf_counter()
        xs = es.ask()
        losses = [score(x) for x in xs]
        es.tell(xs, losses)
        i = int(np.argmin(losses))
        if losses[i] < best_loss:
            best, best_loss = np.asarray(xs[i]), losses[i]
        dt = time.perf_counter() - t0
        if log is not None:
            log.append({"generation": g + 1, "best": best_loss, "mean": float(np.mean(losses)),
                        "candidates_per_minute": 60 * len(xs) / dt})
        bar.set_postfix(best=f"{best_loss:.4f}")
        bar.update(1)
    bar.close()
    return unflatten(jnp.asarray(best, jnp.float32)), best_loss


def cocktail_weights(cfg, models: list, batches: list[dict], temperature: float = 1.0) -> np.ndarray:
    """LM-Cocktail: w = softmax(−L_m / T) from each model's objective on the data."""
    if temperature <= 0:
        raise JmergeError(f"cocktail temperature must be positive (got {temperature})")
    fn = jax.jit(lambda p, b: weighted_ce(hidden(p, cfg, b["input_ids"], b["attention_mask"]), b))
    losses = np.array([np.mean([float(fn(m, b)) for b in batches]) for m in models])
    z = -losses / temperature
    w = np.exp(z - z.max())
    return w / w.sum(), losses


@jax.jit
def linear_merge(models: list, weights):
    """Σ_m w_m θ_m in float32, cast to the first model's dtypes."""
    return jax.tree.map(lambda *xs: sum(w * x.astype(jnp.float32) for w, x in zip(weights, xs)).astype(xs[0].dtype),
                        *models)
