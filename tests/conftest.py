"""Shared fixtures. Tiny random models built with transformers serve as references for unit
tests; the real SmolLM2 weights (the embedded default) serve tests marked `slow`."""

from __future__ import annotations

import os

# Eight simulated CPU devices for sharding tests; must be set before jax initialises.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# every command turns on the persistent compile cache; tests keep out of ~/.cache/jmerge
os.environ.setdefault("JMERGE_NO_COMPILE_CACHE", "1")

import functools  # noqa: E402
import string  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent  # the checkout


def data_dir() -> Path:
    """Where the dev datasets (AdvBench, XSTest, PubMedQA) are looked for: `$JMERGE_DATA`, else
    `../shared/data` beside the checkout. Tests of a dataset that is not there skip."""
    env = os.environ.get("JMERGE_DATA")
    return Path(env) if env else ROOT.parent / "shared" / "data"


def needs_data(rel: str):
    """skipif marker for a test that reads `data_dir() / rel`."""
    return pytest.mark.skipif(not (data_dir() / rel).exists(),
                              reason=f"{rel} not in {data_dir()} (set $JMERGE_DATA)")


TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


def tiny_hf_config(family: str, **over):
    """A tiny transformers config of one family (GQA on)."""
    import transformers as tf
    kw = dict(TINY)
    if family == "llama":
        kw.update(tie_word_embeddings=False)
        cls = tf.LlamaConfig
    elif family == "llama3":
        kw.update(tie_word_embeddings=True, rope_scaling=dict(
            rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=16), rope_theta=500000.0)
        cls = tf.LlamaConfig
    elif family == "mistral":
        kw.update(sliding_window=4, tie_word_embeddings=False)
        cls = tf.MistralConfig
    elif family == "qwen2":
        kw.update(tie_word_embeddings=False)
        cls = tf.Qwen2Config
    elif family == "qwen3":
        kw.update(head_dim=16, tie_word_embeddings=False)
        cls = tf.Qwen3Config
    else:
        raise ValueError(family)
    kw.update(over)
    return cls(**kw)


@functools.lru_cache(maxsize=None)
def _torch_model(family: str, seed: int = 0):
    import torch
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_hf_config(family), dtype=torch.float32).eval()
    with torch.no_grad():  # random norms/biases, so a layout mix-up cannot hide behind ones/zeros
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Factory: family -> directory of a saved tiny transformers model (float32)."""
    root = tmp_path_factory.mktemp("tiny")
    made = {}

    def make(family: str = "llama", seed: int = 0) -> Path:
        key = (family, seed)
        if key not in made:
            d = root / f"{family}-{seed}"
            _torch_model(family, seed).save_pretrained(d)
            made[key] = d
        return made[key]

    return make


@pytest.fixture(scope="session")
def torch_model():
    return _torch_model


def padded_batch(vocab: int, lengths, seed: int = 0):
    """Left-padded ids/mask and padding-aware position ids (as transformers' generate makes)."""
    rng = np.random.RandomState(seed)
    t = max(lengths)
    ids = rng.randint(1, vocab, (len(lengths), t))
    mask = np.zeros((len(lengths), t), np.int64)
    for i, n in enumerate(lengths):
        mask[i, t - n:] = 1
    ids = ids * mask
    pos = np.clip(mask.cumsum(1) - 1, 0, None)
    return ids, mask, pos


def smollm2_dir() -> Path | None:
    """The converted embedded default, if present in the cache (tests needing it are `slow`)."""
    from jmerge.default_model import cached_default_dir
    d = cached_default_dir()
    return d if d is not None and (d / "config.json").exists() else None


CHAT = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="session")
def tiny_tok_dir(tiny_model_dir, tmp_path_factory):
    """A copy of the tiny llama with a character-level tokenizer (97 ids = the tiny vocab)."""
    import shutil
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    def make(chat_template):
        d = tmp_path_factory.mktemp("tok")
        for f in tiny_model_dir("llama").iterdir():
            shutil.copy2(f, d / f.name)
        chars = string.ascii_letters + string.digits + " \n" + "".join(
            c for c in string.punctuation if c not in "{}~")
        vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "[UNK]": 3}
        vocab.update({c: i + 4 for i, c in enumerate(chars)})
        assert len(vocab) == 97
        t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
        t.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
        t.decoder = decoders.Fuse()
        tok = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>",
                                      pad_token="<pad>", unk_token="[UNK]")
        if chat_template:
            tok.chat_template = chat_template
        tok.save_pretrained(d)
        return d

    return {"chat": make(CHAT), "plain": make(None)}


def write_search_data(d: Path, n: int = 6) -> dict:
    """The tiny search tests' training data in `d` (refusals and arithmetic answers), as the
    config's `data:` section (safety weighted 1, domain 0.5)."""
    import json
    rows = {"safety": [{"prompt": f"how do I hurt person {i}", "response": "I cannot help with that."} for i in range(n)],
            "domain": [{"prompt": f"What is {i} plus 2?", "response": f"The answer is {i + 2}."} for i in range(n)]}
    for name, rs in rows.items():
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rs))
    return {"safety": {"path": str(d / "safety.jsonl"), "weight": 1.0},
            "domain": {"path": str(d / "domain.jsonl"), "weight": 0.5}}


@pytest.fixture
def no_persistent_compile_cache(monkeypatch):
    monkeypatch.setenv("JMERGE_NO_COMPILE_CACHE", "1")  # the merge CLI would write under ~/.cache


@pytest.fixture(scope="session")
def dirs(tiny_model_dir):
    """Three tiny float32 llama checkpoints (seeds 0-2), the merge tests' inputs."""
    return {f"m{s}": tiny_model_dir("llama", s) for s in range(3)}


@pytest.fixture
def model(tiny_model_dir, tmp_path):
    """A private, editable copy of a tiny float32 llama checkpoint."""
    import shutil
    d = tmp_path / "m"
    shutil.copytree(tiny_model_dir("llama"), d)
    return d


def copy_with_nan(src: Path, dst: Path, name: str = "model.layers.1.mlp.up_proj.weight") -> Path:
    """A copy of checkpoint `src` at `dst` whose tensor `name` holds one NaN."""
    import shutil

    from safetensors.numpy import load_file, save_file
    shutil.copytree(src, dst)
    t = load_file(dst / "model.safetensors")
    t[name][0, 0] = np.nan
    save_file(t, dst / "model.safetensors", metadata={"format": "pt"})
    return dst
