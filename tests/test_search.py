"""Gradient search in the graph: coefficients and SOMF masks on tiny models."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmerge import data
from jmerge.io import load_model
from jmerge.models import llama
from jmerge.search.gradient import GradientSearch, SearchSpec, mixed_batch
from jmerge.search.merged import materialise, merged_forward, task_vectors
from jmerge.search.parametrisations import Coefficients, Masks


class Model:
    def __init__(self, cfg, params):
        self.cfg, self.params = cfg, params


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    """Base and two experts with peaked output distributions (transformers' 0.02 init gives
    near-uniform logits, where no merge can explain data better than another): weights scaled
    up, experts = base + large independent perturbations."""
    cfg = load_model(tiny_model_dir("llama")).cfg
    rng = np.random.default_rng(0)

    def noise(x, std):
        return jnp.asarray(rng.normal(0, std, x.shape), x.dtype) if x.ndim > 1 else x

    base = jax.tree.map(lambda x: noise(x, 0.3), llama.init_params(cfg))
    experts = [jax.tree.map(lambda x: x + noise(x, 0.3), base) for _ in range(2)]
    return [Model(cfg, p) for p in [base] + experts]


def greedy_data(m, n=8, prompt_len=5, new=6, seed=0):
    """Prompts with expert m's own greedy continuations as responses."""
    rng = np.random.default_rng(seed)
    fwd = jax.jit(lambda p, i: llama.forward(p, m.cfg, i))
    out = []
    for _ in range(n):
        ids = rng.integers(1, m.cfg.vocab_size, prompt_len)
        for _ in range(new):
            ids = np.append(ids, int(np.asarray(fwd(m.params, ids[None]))[0, -1].argmax()))
        out.append(data.Example(ids.astype(np.int32), np.r_[np.zeros(prompt_len), np.ones(new)].astype(np.int32)))
    return out


def test_coefficients_formula_and_in_graph_forward(models):
    base, a, b = (m.params for m in models)
    cfg = models[0].cfg
    param = Coefficients(k=2, modules=("q_proj", "up_proj"))
    theta = param.theta0(cfg.num_layers)
    theta["layers"] = theta["layers"].at[1, 0, 0].set(0.9).at[2, 1, 1].set(-0.4)
    theta["rest"] = jnp.array([0.2, 0.7])
    tvs = task_vectors(base, [a, b])
    merged = materialise(base, tvs, theta, param)
    q = lambda p: np.asarray(p["model"]["layers"]["self_attn"]["q_proj"]["weight"], np.float64)  # noqa: E731
    up = lambda p: np.asarray(p["model"]["layers"]["mlp"]["up_proj"]["weight"], np.float64)  # noqa: E731
    # By hand: layer 1 q_proj uses λ = (0.9, 0.5); layer 2 up_proj uses λ = (0.5, -0.4); k_proj (not
    # a listed module) uses column 0 of its layer; the embedding uses the `rest` λ. float32 merge
    # against float64: measured <= 9e-8 on weights up to 1.3, so atol 1e-6 leaves 11x.
    np.testing.assert_allclose(q(merged)[1], q(base)[1] + 0.9 * (q(a) - q(base))[1] + 0.5 * (q(b) - q(base))[1], atol=1e-6)
    np.testing.assert_allclose(up(merged)[2], up(base)[2] + 0.5 * (up(a) - up(base))[2] - 0.4 * (up(b) - up(base))[2], atol=1e-6)
    emb = lambda p: np.asarray(p["model"]["embed_tokens"]["weight"], np.float64)  # noqa: E731
    np.testing.assert_allclose(emb(merged), emb(base) + 0.2 * (emb(a) - emb(base)) + 0.7 * (emb(b) - emb(base)), atol=1e-6)
    ids = np.random.default_rng(0).integers(1, cfg.vocab_size, (2, 7))
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    in_graph = merged_forward(base, tvs, theta, cfg, batch, param)
    # Measured: the same bits here; 1e-6 is one float32 ulp at the largest logit (14.5), room for
    # another compiler's fusion, and far below a wrong λ's effect.
    np.testing.assert_allclose(np.asarray(in_graph), np.asarray(llama.forward(merged, cfg, ids)), rtol=0, atol=1e-6)


def test_coefficient_search_moves_toward_the_expert_that_explains_the_data(models):
    base, a, b = models
    typed = {"expert_a": (greedy_data(a), 1.0)}
    param = Coefficients(k=2, transform="clamp", init=0.5)
    s = GradientSearch(base.cfg, base.params, [a.params, b.params], param, SearchSpec(steps=25, lr=5e-2, batch_size=4), param.theta0(base.cfg.num_layers))
    log = []
    s.fit(typed, progress=False, log=log)
    losses = [r["loss"] for r in log]
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses
    lam = np.asarray(s.theta["layers"])[..., 0]  # [L, K]
    assert lam[:, 0].mean() > 0.75 and lam[:, 1].mean() < 0.25, lam
    assert np.all((lam >= 0) & (lam <= 1))


def test_mask_search_reduces_loss_and_exports(models):
    base, a, b = models
    typed = {"expert_a": (greedy_data(a), 1.0)}
    param = Masks(k=1, lam=(1.0,), shared=True, granularity="row")
    s = GradientSearch(base.cfg, b.params, [a.params], param, SearchSpec(steps=20, lr=0.2, batch_size=4), param.theta0(base.params))
    log = []
    s.fit(typed, progress=False, log=log)
    losses = [r["loss"] for r in log]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]), losses
    soft = s.merged(Masks(k=1, lam=(1.0,), granularity="row", mode="soft"))
    ones = s.merged(Masks(k=1, lam=(1.0,), granularity="row", mode="ones"))
    # With every mask at 1 the fusion is the expert itself: base + τ = θ_a.
    for x, y in zip(jax.tree.leaves(ones), jax.tree.leaves(a.params)):  # measured <= 2.4e-7 (b + (a - b))
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=2e-6)
    assert any(not np.allclose(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(soft), jax.tree.leaves(a.params)))


def test_mixed_batch_weights_each_type_by_its_tokens():
    exs = [data.Example(np.arange(1, 6, dtype=np.int32), np.array([0, 0, 1, 1, 1], np.int32))]
    one = data.collate(exs, 8, 2)
    two = data.collate(exs * 2, 16, 2)
    b = mixed_batch([(one, 1.0), (two, 3.0)])
    assert b["input_ids"].shape == (4, 16)
    np.testing.assert_allclose(b["weight"][:2].sum(), 1.0)
    np.testing.assert_allclose(b["weight"][2:].sum(), 3.0)


def test_resume_is_bit_identical(models, tmp_path):
    base, a, b = models
    typed = {"a": (greedy_data(a, n=4), 1.0), "b": (greedy_data(b, n=4, seed=1), 0.5)}
    param = Coefficients(k=2)
    spec = SearchSpec(steps=6, lr=5e-2, batch_size=2, checkpoint_every=2)
    ref = GradientSearch(base.cfg, base.params, [a.params, b.params], param, spec, param.theta0(3)).fit(typed, progress=False)
    import jmerge.search.gradient as G
    real, calls = G._step, []

    def crash(*args, **kw):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kw)
    G._step = crash
    try:
        with pytest.raises(KeyboardInterrupt):
            GradientSearch(base.cfg, base.params, [a.params, b.params], param, spec, param.theta0(3)).fit(typed, ckpt_dir=tmp_path, progress=False)
    finally:
        G._step = real
    again = GradientSearch(base.cfg, base.params, [a.params, b.params], param, spec, param.theta0(3)).fit(typed, ckpt_dir=tmp_path, progress=False)
    assert again.step == 6
    np.testing.assert_array_equal(np.asarray(again.theta["layers"]), np.asarray(ref.theta["layers"]))


def _batches(exs, n=2, size=4):
    return [mixed_batch([(data.collate(exs[i * size:(i + 1) * size], 16, size), 1.0)]) for i in range(n)]


def np_response_ce(params, cfg, batch):
    """Mean −log p over a batch's response tokens (loss_mask), log-softmax in float64 numpy."""
    logits = np.asarray(llama.forward(params, cfg, batch["input_ids"], batch["attention_mask"]), np.float64)
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    ids, lm = np.asarray(batch["input_ids"]), np.asarray(batch["loss_mask"], np.float64)
    picked = np.take_along_axis(logp[:, :-1], ids[:, 1:, None], -1)[..., 0]  # token t given < t
    return -(picked * lm[:, 1:]).sum() / lm[:, 1:].sum()


def np_task_arithmetic(base, experts, w_layers, w_rest):
    """θ_0 + Σ_k w_k (θ_k − θ_0) in float64 numpy: w_layers [L, K] per decoder layer, w_rest [K]."""
    def leaf(path, b, *xs):
        b = np.asarray(b, np.float64)
        stacked = tuple(k.key for k in path[:2]) == ("model", "layers")
        out = b.copy()
        for k, x in enumerate(xs):
            w = np.asarray(w_layers)[:, k].reshape((-1,) + (1,) * (b.ndim - 1)) if stacked else w_rest[k]
            out += w * (np.asarray(x, np.float64) - b)
        return jnp.asarray(out, jnp.float32)
    return jax.tree_util.tree_map_with_path(leaf, base, *experts)


def test_evolve_improves_and_prefers_the_right_expert(models):
    from jmerge.search.parametrisations import MethodSettings
    from jmerge.search.population import EvolveSpec, evolve
    base, a, b = models
    batches = _batches(greedy_data(a))
    param = MethodSettings("task_arithmetic", k=2, names=("weight",))
    log = []
    theta, best = evolve(base.cfg, base.params, [a.params, b.params], param, {"weight": 0.5}, batches,
                         EvolveSpec(generations=5, popsize=8), progress=False, log=log)
    assert len(log) == 5 and log[-1]["candidates_per_minute"] > 0

    def loss(w_layers, w_rest):  # the objective recomputed outside the search: merge, then CE
        merged = np_task_arithmetic(base.params, [a.params, b.params], w_layers, w_rest)
        return sum(np_response_ce(merged, base.cfg, bt) for bt in batches)
    w = np.asarray(theta["layers"]["model"])[:, 0, :]  # [L, K]
    found = loss(w, np.asarray(theta["rest"]["model"])[0])
    start = loss(np.full((base.cfg.num_layers, 2), 0.5), np.full(2, 0.5))
    # The reported loss is the returned θ's: float32 against float64, measured 2e-7 relative.
    np.testing.assert_allclose(best, found, rtol=2e-6)
    # Measured: 16.3 at the start point, 12.4 for the best of the first generation, 6.06 after
    # five: a search that kept its start point or stopped learning after one generation fails.
    assert found < 0.6 * start, (found, start)
    assert w[:, 0].mean() > w[:, 1].mean(), w


def test_cocktail_weights_are_softmax_of_negative_losses(models):
    from jmerge.search.population import cocktail_weights, linear_merge
    base, a, b = models
    batches = _batches(greedy_data(a))
    w, losses = cocktail_weights(base.cfg, [a.params, b.params], batches, temperature=2.0)
    # Each model's loss recomputed in numpy from its logits: mean over batches of response CE.
    want_l = np.array([np.mean([np_response_ce(m.params, base.cfg, bt) for bt in batches]) for m in (a, b)])
    np.testing.assert_allclose(losses, want_l, rtol=1e-6)  # measured 3.6e-8 relative
    want = np.exp(-want_l / 2.0) / np.exp(-want_l / 2.0).sum()
    np.testing.assert_allclose(w, want, rtol=1e-6)  # measured 7e-8 relative
    assert want_l[0] < want_l[1] and w[0] > 0.5  # the data is expert a's
    merged = linear_merge([a.params, b.params], jnp.asarray(w))
    q = lambda p: np.asarray(p["model"]["layers"]["self_attn"]["q_proj"]["weight"])  # noqa: E731
    np.testing.assert_allclose(q(merged), w[0] * q(a.params) + w[1] * q(b.params), atol=1e-6)


def _triples(a, b, n=6, seed=3):
    """Same prompts; chosen = expert a's greedy answer, rejected = expert b's."""
    from jmerge.search.preference import Preference
    return [Preference(c, r) for c, r in zip(greedy_data(a, n, seed=seed), greedy_data(b, n, seed=seed))]


def np_sequence_logprob(params, cfg, batch):
    """Σ over response tokens of log p(token | prefix) per row, float64 numpy."""
    logits = np.asarray(llama.forward(params, cfg, batch["input_ids"], batch["attention_mask"]), np.float64)
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    ids, lm = np.asarray(batch["input_ids"]), np.asarray(batch["loss_mask"], np.float64)
    return (np.take_along_axis(logp[:, :-1], ids[:, 1:, None], -1)[..., 0] * lm[:, 1:]).sum(1)


def np_dpo(pc, pr, rc, rr, beta):
    """Rafailov et al. 2023, eq. 7: −E log σ(β (log π(y_w)/π_ref(y_w) − log π(y_l)/π_ref(y_l)))."""
    margin = beta * ((pc - rc) - (pr - rr))
    return float(np.mean(np.log1p(np.exp(-margin))))  # −log σ(m) = log(1 + e^−m)


def test_dpo_of_the_merged_forward_matches_dpo_on_materialised_params(models):
    from jmerge.search.preference import dpo_objective, preference_batches, reference_logprobs
    base, a, b = models
    cfg = base.cfg
    prefs = _triples(a, b, n=3)
    prefs[1] = type(prefs[1])(prefs[1].chosen, data.Example(prefs[1].rejected.ids[:8], prefs[1].rejected.loss_mask[:8]))
    param = Masks(k=1, lam=(0.8,), granularity="row", mode="soft")
    theta = param.theta0(b.params)
    rng = np.random.default_rng(0)
    theta = jax.tree.map(lambda t: jnp.asarray(rng.normal(0, 2, t.shape), jnp.float32), theta)
    tvs = task_vectors(b.params, [a.params])
    batch = next(preference_batches(prefs, batch_size=3, seed=0))  # all three triples, some order
    assert batch["input_ids"].shape[0] == 6
    batch["ref_logprob"] = reference_logprobs(base.params, batch, cfg=cfg)
    got = dpo_objective(merged_forward(b.params, tvs, theta, cfg, batch, param), batch, beta=0.3)
    # By hand: chosen and rejected answers in separate batches, in the triples' own order, their
    # log-probs and the DPO formula in numpy.
    merged = materialise(b.params, tvs, theta, param)
    side = {k: data.collate([getattr(p, k) for p in prefs], 16, 3) for k in ("chosen", "rejected")}
    pc, pr = (np_sequence_logprob(merged, cfg, side[k]) for k in ("chosen", "rejected"))
    rc, rr = (np_sequence_logprob(base.params, cfg, side[k]) for k in ("chosen", "rejected"))
    want = np_dpo(pc, pr, rc, rr, beta=0.3)
    # float32 log-probs (sums of ~10 terms of ~-5) against float64: measured 1.8e-6 relative on a
    # loss of 0.14 (an absolute 2.5e-7); 1e-5 leaves 5x.
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    assert abs(want - np.log(2)) > 1e-2  # the merged model is not the reference


def test_dpo_mask_search_lowers_the_dpo_loss(models):
    from jmerge.search.preference import dpo_objective, preference_batches, reference_logprobs
    base, a, b = models
    prefs = _triples(a, b)
    param = Masks(k=1, lam=(0.5,), granularity="row")
    soft = Masks(k=1, lam=(0.5,), granularity="row", mode="soft")
    spec = SearchSpec(steps=12, lr=0.1, batch_size=6, objective="dpo", beta=0.1)
    # The fusion is halfway from b to a; the data prefers a's answers over b's, so masks that
    # put the task vector's weight on the rows that carry a's answers lower the loss.
    s = GradientSearch(base.cfg, b.params, [a.params], param, spec, param.theta0(b.params), reference=base.params)
    batch = next(preference_batches(prefs, batch_size=6, seed=1))
    batch["ref_logprob"] = reference_logprobs(base.params, batch, cfg=base.cfg)

    def soft_loss(theta):  # deterministic: soft masks, one fixed batch of every triple
        return float(dpo_objective(merged_forward(b.params, s.tvs, theta, base.cfg, batch, soft), batch, 0.1))
    before = soft_loss(s.theta)
    log = []
    s.fit({"prefs": (prefs, 1.0)}, progress=False, log=log)
    losses = [r["loss"] for r in log]  # sampled masks: noisy step to step
    assert np.mean(losses[-4:]) < np.mean(losses[:4]), losses
    assert soft_loss(s.theta) < 0.5 * before, (before, soft_loss(s.theta))


def test_preference_type_joined_to_ce_adds_weighted_dpo(models):
    """One batch of CE rows with preference triples appended: its objective is the CE of the CE
    rows alone plus w · DPO of the triples alone, each computed on its own batch."""
    from jmerge.search.gradient import _objective, mixed_stream
    from jmerge.search.merged import weighted_ce
    from jmerge.search.preference import dpo_objective, preference_batches, reference_logprobs
    base, a, b = models
    cfg = base.cfg
    theta = Coefficients(k=2).theta0(cfg.num_layers)
    tvs = task_vectors(base.params, [a.params, b.params])
    typed = {"a": (greedy_data(a, 4), 1.0), "b": (greedy_data(b, 4, new=9, seed=5), 0.5)}
    prefs = _triples(a, b, n=4)
    spec = SearchSpec(batch_size=2, beta=0.2)
    joined = next(mixed_stream(typed, 2, 0, prefs=(preference_batches(prefs, 2, 1), 0.7)))
    ce, pref = next(mixed_stream(typed, 2, 0)), next(preference_batches(prefs, 2, 1))
    assert joined["input_ids"].shape[0] == 4 + 4 and float(joined["weight"][4:].sum()) == 0.0
    fwd = lambda batch: merged_forward(base.params, tvs, theta, cfg, batch, Coefficients(k=2))  # noqa: E731
    joined["ref_logprob"] = reference_logprobs(base.params, {k: joined[k][-4:] for k in ("input_ids", "attention_mask", "loss_mask")}, cfg=cfg)
    pref["ref_logprob"] = reference_logprobs(base.params, pref, cfg=cfg)
    got = float(_objective(fwd(joined), joined, spec))
    want = float(weighted_ce(fwd(ce), ce)) + 0.7 * float(dpo_objective(fwd(pref), pref, 0.2))
    np.testing.assert_allclose(got, want, rtol=1e-6)  # measured 1.7e-9 relative
    assert abs(got - float(weighted_ce(fwd(ce), ce))) > 1e-3  # the DPO term is there


def test_coefficient_search_with_a_joined_preference_type(models, tmp_path):
    """CE on expert b's data plus a heavy DPO term preferring expert a's answers over b's: the
    search moves toward a, and another preference weight is another run (no resume)."""
    from jmerge.errors import JmergeError
    base, a, b = models
    param = Coefficients(k=2, transform="clamp", init=0.5)
    spec = SearchSpec(steps=10, lr=0.1, batch_size=3, beta=0.5, checkpoint_every=5)
    s = GradientSearch(base.cfg, base.params, [a.params, b.params], param, spec,
                       param.theta0(base.cfg.num_layers), reference=base.params)
    log = []
    s.fit({"b": (greedy_data(b, 6), 0.01)}, ckpt_dir=tmp_path, progress=False, log=log,
          prefs=(_triples(a, b), 5.0))
    lam = np.asarray(s.theta["layers"])[:, :, 0]
    assert lam[:, 0].mean() > lam[:, 1].mean(), lam
    again = GradientSearch(base.cfg, base.params, [a.params, b.params], param, spec,
                           param.theta0(base.cfg.num_layers), reference=base.params)
    with pytest.raises(JmergeError, match="another model or config"):
        again.fit({"b": (greedy_data(b, 6), 0.01)}, ckpt_dir=tmp_path, progress=False,
                  prefs=(_triples(a, b), 1.0))


@pytest.mark.parametrize("kw,needle", [
    (dict(objective="dpo", beta=0.0), "beta must be positive"),
    (dict(objective="dpo", beta=-1.0), "beta must be positive"),
    (dict(objective="kl"), "unknown search objective 'kl'"),
    (dict(objective="dpo"), "needs a reference model"),
])
def test_dpo_spec_errors(models, kw, needle):
    from jmerge.errors import JmergeError
    base, a, _ = models
    param = Coefficients(k=1)
    with pytest.raises(JmergeError, match=needle):
        GradientSearch(base.cfg, base.params, [a.params], param, SearchSpec(**kw), param.theta0(3))


def test_preference_rows_read_and_encode(tiny_tok_dir, tmp_path):
    import json

    from transformers import AutoTokenizer

    from jmerge.errors import JmergeError
    from jmerge.search.preference import encode_preferences, read_preferences
    good = {"prompt": "how do I hurt someone", "chosen": "I cannot help.", "rejected": "First, you"}
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps(good) + "\n")
    tok = AutoTokenizer.from_pretrained(tiny_tok_dir["chat"])
    (p,) = encode_preferences(tok, read_preferences(f), max_len=64)
    prompt = [ex.ids[:ex.loss_mask.argmax()].tolist() for ex in (p.chosen, p.rejected)]
    assert prompt[0] == prompt[1] and len(prompt[0]) > 0
    assert tok.decode(p.chosen.ids[p.chosen.loss_mask == 1]).startswith("I cannot help.")
    for row, needle in ((dict(good, rejected=""), "line 2: missing 'rejected'"),
                        ({"prompt": "x", "rejected": "y"}, "line 2: missing 'chosen'")):
        f.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
        with pytest.raises(JmergeError, match=needle):
            read_preferences(f)
    f.write_text("\n")
    with pytest.raises(JmergeError, match="no records"):
        read_preferences(f)
    with pytest.raises(JmergeError, match="both answers"):  # the prompt alone fills max_len
        encode_preferences(tok, [good], max_len=8)


def test_mask_logits_are_laid_out_like_the_params(tiny_model_dir):
    from jmerge import sharding
    m = load_model(tiny_model_dir("llama"), mesh=sharding.make_mesh("fsdp=4,tensor=2"))
    q = m.params["model"]["layers"]["self_attn"]["q_proj"]["weight"]
    for granularity in ("element", "row"):
        theta = Masks(k=1, lam=(1.0,), granularity=granularity).theta0(m.params)
        lq = theta["layers"][0]["self_attn"]["q_proj"]["weight"]
        assert lq.sharding.mesh == q.sharding.mesh
        want = q.sharding.spec if granularity == "element" else (None, "tensor", None)
        assert tuple(lq.sharding.spec) == tuple(want), (granularity, lq.sharding.spec)
