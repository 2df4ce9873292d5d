"""The programs each command's run would compile, lowered from config.json alone (`--dry-run`).

Each function takes the command's parsed flags, the devices, one device's memory and the local
platform, and returns (programs by name, mesh, notes, extra report fields). The lowering itself belongs to each
command's library (`search_programs`, `generation_programs`, `scoring_program`,
`merge_programs`): a dry run compiles what the run compiles, not a copy of it.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp

from jmerge import sharding as shd
from jmerge.dryrun import size
from jmerge.errors import JmergeError

DTYPES = ("float32", "bfloat16", "float16")


def model_config(ref: str):
    """A model's config without reading a weight: config.json of a directory (the base of
    BASE+ADAPTER), or a GGUF file's header."""
    from jmerge.config import load_config
    from jmerge.io import split_adapter
    path = Path(split_adapter(str(ref))[0])
    if path.is_dir() or path.suffix == ".json":
        return load_config(path)
    if not path.exists():
        raise JmergeError(f"{path}: no such file or directory")
    from jmerge.io.source import open_source
    return open_source(str(ref)).cfg


def checkpoint_dtype(cfg, given: str | None):
    """--dtype, else the dtype config.json names (the checkpoint's), else float32."""
    named = given or cfg.hf_config.get("torch_dtype") or cfg.hf_config.get("dtype")
    return jnp.dtype(named if named in DTYPES else "float32")


def abstract_params(cfg, dtype, mesh):
    """The params pytree as ShapeDtypeStructs on the shardings a load onto `mesh` gives them."""
    from jmerge.models.layout import abstract_params as shapes
    tree = shapes(cfg, dtype)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shd.param_shardings(tree, mesh))


def _need(a, what: str) -> int:
    if a.prompt_tokens is None:
        raise JmergeError(f"--dry-run needs --prompt-tokens N for {what}: the longest prompt in tokens "
                          f"(with its chat template)")
    if a.prompt_tokens <= 0:
        raise JmergeError(f"--prompt-tokens must be > 0, got {a.prompt_tokens}")
    return a.prompt_tokens


def _check_context(cfg, tokens: int, ref) -> None:
    if tokens > cfg.max_position_embeddings:
        raise JmergeError(f"{ref}: {tokens} prompt tokens exceed the model's context of "
                          f"{cfg.max_position_embeddings} (max_position_embeddings)")


def _prefixed(prefix: str, programs: dict) -> dict:
    return {f"{prefix}:{k}": v for k, v in programs.items()}


def _generation(cfg, params, mesh, rows, prompt_len, new_tokens, sampling=None) -> dict:
    from jmerge.generate import Sampling, generation_programs
    return generation_programs(cfg, params, mesh, rows, prompt_len, new_tokens, sampling or Sampling(),
                               eos_count=len(cfg.eos_ids))


# ---------------------------------------------------------------------------------- generate

def _prompts(a) -> tuple[int, int] | None:
    """(number of prompts, the longest one in tokens) of `jmerge generate`'s prompt set, through
    the model's tokenizer and chat template; None when the model has no tokenizer files."""
    from jmerge.eval.prompts import load_prompts
    from jmerge.generate import encode_prompts, has_tokenizer_files, load_tokenizer, tokenizer_home
    home = tokenizer_home(a.model)
    if not has_tokenizer_files(home):
        return None
    texts = [q.text for q in load_prompts(a.prompts, field=a.field)[:a.limit]]
    ids = encode_prompts(load_tokenizer(home, None, a.chat_template), texts, not a.no_chat_template, a.system)
    return len(ids), max(map(len, ids), default=1)


def generate(a, devices, memory, platform):
    from jmerge.generate import Sampling
    cfg = model_config(a.model)
    found = _prompts(a) if a.prompt_tokens is None else None
    count, tokens = found or (a.limit or a.batch_size, _need(a, "generate (the model has no tokenizer)"))
    _check_context(cfg, tokens, a.model)
    mesh = shd.make_mesh(a.mesh, devices)
    params = abstract_params(cfg, checkpoint_dtype(cfg, a.dtype), mesh)
    rows = min(a.batch_size, count)
    sampling = Sampling(a.temperature, a.top_k, a.top_p, a.seed)
    programs = _generation(cfg, params, mesh, rows, tokens, a.max_new_tokens, sampling)
    notes = [f"batch {rows} x ({tokens} prompt + {a.max_new_tokens} new) tokens, {params_dtype(params)}"]
    return programs, mesh, notes, {}


def params_dtype(params) -> str:
    return str(jax.tree.leaves(params)[0].dtype)


# -------------------------------------------------------------------------------------- eval

def eval(a, devices, memory, platform):  # noqa: A001  (the command's name)
    from jmerge.eval.runtime import scoring_program
    from jmerge.eval.suites import parse_suites
    suites = parse_suites(a.suite)
    tokens = _need(a, "eval")
    mesh = shd.make_mesh(a.mesh, devices)
    programs, notes, seen = {}, [], {}
    for ref in a.models:
        cfg = model_config(ref)
        _check_context(cfg, tokens, ref)
        params = abstract_params(cfg, checkpoint_dtype(cfg, a.dtype), mesh)
        shape = (cfg, params_dtype(params))
        if shape in seen:  # the same shape reuses the compiled programs of the first such model
            notes.append(f"{ref}: same programs as {seen[shape]}")
            continue
        seen[shape] = ref
        name = Path(str(ref).rstrip("/")).name
        if {"safety", "overrefusal", "domain", "jailbreak"} & set(suites):
            programs.update(_prefixed(name, _generation(cfg, params, mesh, a.batch_size, tokens, a.max_new_tokens)))
        if "domain" in suites:
            length = max(tokens, a.context_tokens)
            programs[f"{name}:score"] = scoring_program(cfg, params, mesh, a.batch_size, length)
    notes.append(f"suites {','.join(suites)}: generation batch {a.batch_size} x ({tokens} prompt + "
                 f"{a.max_new_tokens} new) tokens" + ("; the judge model is not included" if a.judge else ""))
    return programs, mesh, notes, {}


# ------------------------------------------------------------------------------------ search

def _search_rows(s, typed: list[str]) -> int:
    """Rows of one step's batch: batch_size per CE data type, 2 x batch_size per preference
    batch (chosen and rejected)."""
    if getattr(s, "objective", "ce") == "dpo":
        return 2 * s.batch_size
    return s.batch_size * len(typed) + (2 * s.batch_size if s.prefer else 0)


def _fixed_merges(c, cfg, base, experts, typed, length) -> dict:
    """The search run's other programs: CMA-ES's candidate scorer, the sweep's and the
    baselines' merges (`SearchRun.evolve`, `sweep_points`, `baselines`)."""
    from jmerge.search.export import export_programs, park_abstract
    from jmerge.search.gradient import batch_loss
    from jmerge.search.merged import task_vectors
    from jmerge.search.parametrisations import Coefficients
    from jmerge.search.run import baseline_experts, baseline_param, evolve_param
    # theta, keys and evolve's batches are host values there (uncommitted): the compiler places them
    def placed(theta):
        return jax.eval_shape(lambda: theta)
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)
    tvs = task_vectors(base, list(experts.values()))
    k = len(experts)
    out = {}
    # every merge after the searches is exported from the parked models (`SearchRun.park`)
    parked, parked_experts = park_abstract((base, experts))

    def exported(name, order, theta, param, key=None):
        programs = export_programs(parked, task_vectors(parked, [parked_experts[n] for n in order]),
                                   placed(theta), param, key)
        out.update({f"{name}:{p}": lowered for p, lowered in programs.items()})
    if (s := c.searches.get("evolve")) is not None:
        param, init = evolve_param(s, k)
        rows = s.batch_size * len([n for n in typed if c.data[n].weight > 0])
        batch = {n: jax.ShapeDtypeStruct((rows, length), jnp.float32 if n == "weight" else jnp.int32)
                 for n in ("input_ids", "attention_mask", "loss_mask", "weight")}
        out["evolve:score"] = batch_loss.lower(placed(param.theta0(cfg.num_layers, init)), base, tvs, batch, key,
                                               cfg=cfg, param=param)
        exported("evolve", list(experts), param.theta0(cfg.num_layers, init), param, key)
    if (s := c.searches.get("sweep")) is not None:
        theta = {"layers": jnp.zeros((cfg.num_layers, 2, 1), jnp.float32), "rest": jnp.zeros((2,), jnp.float32)}
        exported("sweep", [s.domain, s.align], theta, Coefficients(k=2))
    for b in c.baselines:
        if b == "mergealign":
            if k == 2:
                theta = {"layers": jnp.zeros((cfg.num_layers, 2, 1)), "rest": jnp.zeros((2,))}
                exported("baseline:mergealign", list(experts), theta, Coefficients(k=2))
            continue
        order = baseline_experts(c, b)
        param, theta = baseline_param(b, len(order), cfg.num_layers)
        exported(f"baseline:{b}", order, theta, param, key)
    return out


def search(a, devices, memory, platform):
    from jmerge import data
    from jmerge.search import config as C
    from jmerge.search.gradient import search_programs
    from jmerge.search.run import coefficient_param, mask_param, search_spec
    c = C.load(a.config)
    mesh = shd.make_mesh(c.mesh, devices)
    cfg = model_config(c.base)
    dtype = jnp.dtype(c.dtype)
    base = abstract_params(cfg, dtype, mesh)
    experts = {n: abstract_params(model_config(ref), dtype, mesh) for n, ref in c.experts.items()}
    for name, tree in experts.items():
        if jax.tree.structure(tree) != jax.tree.structure(base) or any(
                x.shape != y.shape for x, y in zip(jax.tree.leaves(tree), jax.tree.leaves(base))):
            raise JmergeError(f"expert {name} ({c.experts[name]}) has another architecture or shape than the base")
    typed = [n for n in c.data if n not in c.preference_data]
    length = data.bucket(c.max_len)
    programs, notes = {}, []

    def reference(s, objective="ce"):
        if objective == "ce" and not s.prefer:
            return None
        return base if s.reference == "base" else experts[s.reference]

    if (s := c.searches.get("coefficients")) is not None:
        param = coefficient_param(s, len(experts), base)
        rows = _search_rows(s, typed)
        programs.update(_prefixed("coefficients", search_programs(
            cfg, base, list(experts.values()), param, search_spec(c, s), rows, length, reference(s))))
        notes.append(f"coefficients ({s.granularity}): batch {rows} x {length} tokens, K = {len(experts)}")
    if (s := c.searches.get("masks")) is not None:
        safe = s.safe or next(iter(experts))
        others = [experts[n] for n in experts if n != safe]
        param = mask_param(s, len(others))
        ce_types = typed if s.data is None else [s.data]
        rows = _search_rows(s, ce_types)
        programs.update(_prefixed("masks", search_programs(
            cfg, experts[safe], others, param, search_spec(c, s, s.sparsity, s.objective), rows, length,
            reference(s, s.objective))))
        notes.append(f"masks ({s.granularity}): batch {rows} x {length} tokens, K = {len(others)}")
    programs.update(_fixed_merges(c, cfg, base, experts, typed, length))
    if "cocktail" in c.searches:
        notes.append("not included: cocktail (one forward pass of each expert, less than a search step)")
    ev = c.eval
    prompt = a.prompt_tokens or c.max_len
    _check_context(cfg, prompt, c.base)
    programs.update(_prefixed("eval", _generation(cfg, base, mesh, ev.batch_size, prompt, ev.max_new_tokens)))
    if "domain" in ev.suites:
        from jmerge.eval.runtime import scoring_program
        programs["eval:score"] = scoring_program(cfg, base, mesh, ev.batch_size, prompt)
    notes.append(f"eval: generation batch {ev.batch_size} x ({prompt} prompt + {ev.max_new_tokens} new) tokens")
    # The searches hold the models on the devices; then they are parked in host memory (what
    # each export program brings back of them is in its own peak), and the devices hold one
    # model at a time: the argument of the eval programs.
    parked = sum(shd.device_bytes(x) for t in (base, *experts.values()) for x in jax.tree.leaves(t))
    notes.append(f"after the searches: the base and {len(experts)} experts parked in host memory, {size(parked)} "
                 "per device; each merge exported a group of layers at a time, each model evaluated alone")
    return programs, mesh, notes, {"parked_host_bytes": parked}


# ------------------------------------------------------------------------------------- merge

def merge(a, devices, memory, platform):
    from jmerge.engine.abstract import abstract_prepared
    from jmerge.engine.footprint import memory_need, merge_programs
    mesh = shd.make_mesh(a.mesh, devices)
    p = abstract_prepared(a.config, lenient=a.lenient)
    # A given --device-memory describes the target device: `auto` decides by memory alone, not
    # by the platform this dry run happens to run on.
    programs, mode = merge_programs(p, mesh, a.mode or "auto", memory,
                                    platform=None if a.device_memory else platform, seed=a.seed)
    notes, extra = [f"mode {a.mode or 'auto'}: {mode}"], {"mode": mode}
    if mode == "memory":
        # each program's peak leaves out the merged tensors already placed beside it
        need, stage = memory_need(p, mesh, a.seed)
        notes.append(f"whole in-memory merge: {need / (1 << 30):.2f} GiB per device at its peak ({stage})")
        extra.update(memory_need=need, memory_need_stage=stage)
    return programs, mesh, notes, extra
