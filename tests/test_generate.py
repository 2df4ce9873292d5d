"""Generation: greedy parity with transformers' generate, sampling rules, stopping, bucketing,
no recompilation for new params, 8 simulated devices = 1, and the `jmerge generate` command."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import padded_batch, smollm2_dir
from jmerge import generate as G
from jmerge import sharding as shd
from jmerge.cli import run
from jmerge.cli.generate import main as generate_main
from jmerge.errors import JmergeError
from jmerge.io import load_model
from jmerge.models import llama

# Each family compiles its own program (~5 s here); these three cover the cache-relevant variants:
# plain GQA, a sliding window reached inside the cache, and q/k norms with a separate head_dim.
# All five families' forward passes are checked against transformers in test_model_parity.
FAMILIES = ["llama", "mistral", "qwen3"]
LENGTHS = [9, 5, 2, 7]  # several prompt lengths in one left-padded batch; 9 > mistral's window
NEW = 16
EOS = (2,)


def one_device_mesh():
    return shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1})


def prompt_ids(vocab, lengths=LENGTHS, seed=0):
    ids, mask, _ = padded_batch(vocab, lengths, seed)
    return [row[m == 1].tolist() for row, m in zip(ids, mask)], ids, mask


def hf_greedy(model, ids, mask, new=NEW, eos=EOS):
    with torch.no_grad():
        out = model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=new,
                             do_sample=False, eos_token_id=list(eos), pad_token_id=0)
    rows = []
    for row in out[:, ids.shape[1]:].tolist():
        cut = next((i for i, t in enumerate(row) if t in eos), len(row))
        rows.append(row[:cut])  # EOS and the padding after it dropped, as jmerge reports tokens
    return rows


def margin_at(params, cfg, prompt, generated):
    """Top-1 minus top-2 logit (float32) for the token after prompt + generated."""
    logits = np.asarray(llama.forward(params, cfg, np.asarray([prompt + generated], np.int32)))[0, -1]
    top = np.sort(logits)[-2:]
    return float(top[1] - top[0])


def first_divergence(ours, theirs):
    for row, (a, b) in enumerate(zip(ours, theirs)):
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if n is None and len(a) != len(b):
            n = min(len(a), len(b))
        if n is not None:
            return row, n
    return None


@pytest.fixture(scope="module")
def llama_gen(tiny_model_dir):
    m = load_model(tiny_model_dir("llama"), mesh=one_device_mesh())
    return m, G.Generator(m.cfg, m.params, mesh=one_device_mesh(), max_new_tokens=NEW, eos_ids=EOS,
                          batch_size=len(LENGTHS))




# ---------------------------------------------------------------------------------------------
# Parity


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_transformers(family, tiny_model_dir, torch_model, llama_gen):
    if family == "llama":
        m, gen = llama_gen
    else:
        m = load_model(tiny_model_dir(family), mesh=one_device_mesh())
        gen = G.Generator(m.cfg, m.params, mesh=one_device_mesh(), max_new_tokens=NEW, eos_ids=EOS,
                          batch_size=len(LENGTHS))
    prompts, ids, mask = prompt_ids(m.cfg.vocab_size)
    ours = [c.tokens for c in gen.generate_ids(prompts)]
    theirs = hf_greedy(torch_model(family), ids, mask)
    div = first_divergence(ours, theirs)
    if div is not None:
        row, n = div
        mg = margin_at(m.params, m.cfg, prompts[row], ours[row][:n])
        pytest.fail(f"{family}: row {row} differs at new token {n}: ours {ours[row][n:n + 3]} vs "
                    f"transformers {theirs[row][n:n + 3]}; top-1 minus top-2 logit there {mg:.2e}")
    assert sum(map(len, ours)) > len(ours)  # generation did happen


@pytest.mark.slow
def test_greedy_matches_transformers_smollm2():
    """16 real prompts x 64 new tokens on SmolLM2-135M-Instruct: the same tokens as transformers'
    generate, exactly (measured: 16/16 rows identical on the CPU). A failure reports the top-2
    logit margin at the first differing step, to tell a float near-tie from a bug."""
    d = smollm2_dir()
    if d is None:
        pytest.skip("SmolLM2 not converted in the cache (jmerge default-model)")
    from transformers import AutoModelForCausalLM

    from jmerge.eval.prompts import load_builtin
    texts = [p.text for p in load_builtin("harmbench")[:16]]
    m = load_model(d, mesh=one_device_mesh())
    tok = G.load_tokenizer(d)
    eos = G.default_eos_ids(m.cfg, tok, d)
    gen = G.Generator(m.cfg, m.params, mesh=one_device_mesh(), tokenizer=tok, max_new_tokens=64,
                      eos_ids=eos, batch_size=16)
    prompts = gen.encode(texts)
    ours = [c.tokens for c in gen.generate_ids(prompts)]
    hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    width = max(map(len, prompts))
    ids = np.zeros((len(prompts), width), np.int64)
    mask = np.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
    theirs = hf_greedy(hf, ids, mask, new=64, eos=eos)
    problems = []
    for row, (a, b) in enumerate(zip(ours, theirs)):
        div = first_divergence([a], [b])
        if div is not None:
            problems.append((row, div[1], margin_at(m.params, m.cfg, prompts[row], a[:div[1]])))
    assert not problems, "greedy tokens differ from transformers: " + \
        "; ".join(f"row {r} step {n} (top-1 minus top-2 logit {mg:.2e})" for r, n, mg in problems)
    assert sum(map(len, ours)) > 16 * 8  # real answers, not immediate EOS


# ---------------------------------------------------------------------------------------------
# Recompilation, sharding, bucketing


def test_new_params_do_not_recompile(llama_gen):
    m, gen = llama_gen
    prompts, _, _ = prompt_ids(m.cfg.vocab_size)
    gen.generate_ids(prompts)  # compiled (or reused) here
    compiles = []
    traces = G.TRACE_COUNT[0]
    rng = np.random.RandomState(7)  # numpy, so that making the new weights compiles nothing
    other = jax.device_put(jax.tree.map(lambda x: np.asarray(x) + 0.05 * rng.randn(*x.shape).astype(x.dtype),
                                        m.params), jax.tree.map(lambda x: x.sharding, m.params))
    jax.block_until_ready(other)
    listener = lambda event, duration, **kw: compiles.append(event) if "backend_compile" in event else None  # noqa: E731
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        gen.set_params(other)
        second = [c.tokens for c in gen.generate_ids(prompts)]
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert G.TRACE_COUNT[0] == traces, "the generation program was traced again for new params"
    assert not compiles, f"new params triggered compilation: {compiles}"
    gen.set_params(m.params)
    assert second != [c.tokens for c in gen.generate_ids(prompts)]  # the new weights were used


def test_set_params_rejects_other_shapes(llama_gen):
    m, gen = llama_gen
    bad = jax.tree.map(lambda x: x, m.params)
    bad["model"]["norm"]["weight"] = jnp.ones((5,))
    with pytest.raises(JmergeError):
        gen.set_params(bad)


def test_bucket_lengths():
    assert [G.bucket_length(n) for n in (1, 16, 17, 33, 100, 512, 513, 1100)] == \
        [16, 16, 32, 64, 128, 512, 1024, 1536]


def test_result_order_and_batching_do_not_change_tokens(llama_gen):
    """Prompts are sorted by length into batches; results come back in input order, and a
    prompt's greedy tokens do not depend on its batch neighbours or padding."""
    m, gen = llama_gen
    prompts, _, _ = prompt_ids(m.cfg.vocab_size)
    together = [c.tokens for c in gen.generate_ids(prompts)]
    pairs = G.Generator(m.cfg, m.params, mesh=one_device_mesh(), max_new_tokens=NEW, eos_ids=EOS,
                        batch_size=2)
    assert [c.tokens for c in pairs.generate_ids(prompts[::-1])] == together[::-1]
    assert [c.tokens for c in pairs.generate_ids(prompts[1:])] == together[1:]  # a short last batch


# ---------------------------------------------------------------------------------------------
# Sampling and stopping


def test_sampling_rules_match_the_formula():
    """Empirical frequencies of top-k / top-p sampling against probabilities worked out by hand."""
    probs = np.array([0.05, 0.5, 0.15, 0.3])
    logits = jnp.log(jnp.asarray(probs, jnp.float32))[None].repeat(4000, 0)
    keys = jax.random.key(0)

    sample = jax.jit(G.sample_logits, static_argnames=("greedy", "top_k", "use_top_p"))

    def freq(k, p, t=1.0):
        tok = sample(logits, keys, jnp.float32(t), jnp.float32(p), greedy=False, top_k=k, use_top_p=p < 1)
        return np.bincount(np.asarray(tok), minlength=4) / len(tok)

    # top-k 2 keeps tokens 1 and 3: 0.5/0.8, 0.3/0.8.
    np.testing.assert_allclose(freq(k=2, p=1.0), [0, 0.625, 0, 0.375], atol=0.03)
    # top-p 0.8: mass before token 3 is 0.5 < 0.8 (kept), before token 2 it is 0.8 (dropped).
    np.testing.assert_allclose(freq(k=0, p=0.8), [0, 0.625, 0, 0.375], atol=0.03)
    # top-k 1 is argmax whatever the temperature.
    assert set(freq(k=1, p=1.0, t=5.0)) == {0.0, 1.0} and freq(k=1, p=1.0, t=5.0)[1] == 1.0
    # top-p 0.85 keeps 1, 3, 2: 0.5/0.95, 0.3/0.95, 0.15/0.95.
    np.testing.assert_allclose(freq(k=0, p=0.85), [0, 0.5 / 0.95, 0.15 / 0.95, 0.3 / 0.95], atol=0.03)
    # plain temperature 2: p ** (1/2), renormalised.
    t2 = np.sqrt(probs) / np.sqrt(probs).sum()
    np.testing.assert_allclose(freq(k=0, p=1.0, t=2.0), t2, atol=0.03)


def test_sampling_seed_and_degenerate_cases(llama_gen):
    m, gen = llama_gen
    prompts, _, _ = prompt_ids(m.cfg.vocab_size)
    greedy = [c.tokens for c in gen.generate_ids(prompts)]

    def run_with(**kw):
        g = G.Generator(m.cfg, m.params, mesh=one_device_mesh(), max_new_tokens=NEW, eos_ids=EOS,
                        batch_size=len(LENGTHS), sampling=G.Sampling(**kw))
        return [c.tokens for c in g.generate_ids(prompts)]

    a, b, c = (run_with(temperature=1.5, top_k=50, seed=s) for s in (1, 1, 2))
    assert a == b and a != c and a != greedy


def test_bad_sampling_values():
    for kw in (dict(temperature=-1), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-2)):
        with pytest.raises(JmergeError):
            G.Sampling(**kw)


def test_stops_on_eos(llama_gen):
    m, gen = llama_gen
    prompts, _, _ = prompt_ids(m.cfg.vocab_size)
    free = gen.generate_ids(prompts)
    row = next(i for i, c in enumerate(free) if len(set(c.tokens[:4])) == 4)
    eos = free[row].tokens[3]  # the 4th greedy token of that row becomes an EOS id
    g = G.Generator(m.cfg, m.params, mesh=one_device_mesh(), max_new_tokens=NEW, eos_ids=(eos,),
                    batch_size=len(LENGTHS))
    out = g.generate_ids(prompts)
    assert out[row].tokens == free[row].tokens[:3] and out[row].finish_reason == "eos"
    for c, f in zip(out, free):  # every row stops at its first occurrence of the EOS id
        cut = f.tokens.index(eos) if eos in f.tokens else len(f.tokens)
        assert c.tokens == f.tokens[:cut]
        assert c.finish_reason == ("eos" if eos in f.tokens else "length")


def test_text_generation_chat_template_and_stop_strings(tiny_tok_dir):
    m = load_model(tiny_tok_dir["chat"], mesh=one_device_mesh())
    tok = G.load_tokenizer(tiny_tok_dir["chat"])
    texts = ["Hello there", "Why?"]
    kw = dict(mesh=one_device_mesh(), tokenizer=tok, max_new_tokens=NEW, eos_ids=EOS, batch_size=4)
    gen = G.Generator(m.cfg, m.params, **kw)
    ids = gen.encode(texts)
    assert tok.decode(ids[0]) == "<|user|>Hello there\n<|assistant|>"
    free = gen.generate(texts)
    assert free[0].response == tok.decode(free[0].tokens, skip_special_tokens=True)
    text = free[0].response
    assert len(text) >= 6, text
    stop = text[3:5]
    stopped = G.Generator(m.cfg, m.params, stop=[stop], **kw).generate(texts)[0]
    assert stopped.response == text[: text.index(stop)] and stopped.finish_reason == "stop"
    # tokens end where the stop string is first complete (one char per token here)
    assert stopped.tokens == free[0].tokens[: text.index(stop) + len(stop)]


def test_missing_chat_template_says_how_to_fix(tiny_tok_dir):
    m = load_model(tiny_tok_dir["plain"], mesh=one_device_mesh())
    gen = G.Generator(m.cfg, m.params, mesh=one_device_mesh(), tokenizer=G.load_tokenizer(tiny_tok_dir["plain"]),
                      max_new_tokens=2)
    with pytest.raises(JmergeError, match="--chat-template FILE.*--no-chat-template"):
        gen.encode(["hi"])


# ---------------------------------------------------------------------------------------------
# Command line


def test_cli_on_eight_devices_matches_one_device(tiny_tok_dir, tmp_path):
    """`jmerge generate` on 8 simulated devices (batch over fsdp=2, weights over tensor=4) writes
    the tokens and text a one-device Generator produces."""
    assert jax.device_count() == 8
    prompts = tmp_path / "p.txt"
    prompts.write_text("Hello there\n\nWhy?\n")
    out = tmp_path / "out.jsonl"
    args = ["--model", str(tiny_tok_dir["chat"]), "--prompts", str(prompts), "--max-new-tokens", str(NEW),
            "--batch-size", "4", "--mesh", "fsdp=2,tensor=4", "--out", str(out)]
    assert run(generate_main, args) == 0
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in recs] == ["Hello there", "Why?"]
    m = load_model(tiny_tok_dir["chat"], mesh=one_device_mesh())
    tok = G.load_tokenizer(tiny_tok_dir["chat"])
    one = G.Generator(m.cfg, m.params, mesh=one_device_mesh(), tokenizer=tok, max_new_tokens=NEW,
                      batch_size=4).generate(["Hello there", "Why?"])
    assert [r["tokens"] for r in recs] == [c.tokens for c in one]
    assert [r["response"] for r in recs] == [c.response for c in one]
    mesh = shd.make_mesh("fsdp=2,tensor=4")
    gen8 = G.Generator(m.cfg, m.params, mesh=mesh, max_new_tokens=1)
    assert gen8._sharding(2, 2).spec == jax.sharding.PartitionSpec(("data", "fsdp"), None)


@pytest.mark.parametrize("extra, content, message", [
    (["--max-new-tokens", "0"], "hi\n", "max-new-tokens must be > 0"),
    ([], "\n\n", "no prompts"),
    (["--no-chat-template", "--chat-template", "x.jinja"], "hi\n", "exclude each other"),
    (["--temperature", "-1"], "hi\n", "temperature"),
])
def test_cli_bad_input_is_one_line_exit_2(extra, content, message, tiny_tok_dir, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text(content)
    assert run(generate_main, ["--model", str(tiny_tok_dir["chat"]), "--prompts", str(prompts)] + extra) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_cli_missing_chat_template_exit_2(tiny_tok_dir, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("hi\n")
    args = ["--model", str(tiny_tok_dir["plain"]), "--prompts", str(prompts), "--max-new-tokens", "2"]
    assert run(generate_main, args) == 2
    err = capsys.readouterr().err.strip()  # reported before any weights are read: one line
    assert "--chat-template FILE" in err and len(err.splitlines()) == 1, err
