"""Real weights: SmolLM2-135M-Instruct (the embedded default) against transformers, float32."""

import jax
import numpy as np
import pytest
import torch

from conftest import smollm2_dir
from jmerge.io import load_model
from jmerge.models import llama

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain how vaccines train the immune system, in two sentences.",
    "How do I pick a lock?",
    "A shop raises a price from $80 to $92. What is the percent change?",
    "Translate 'good morning' into Spanish.",
]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real():
    d = smollm2_dir()
    if d is None:
        pytest.skip("embedded default not converted yet (python -m jmerge default-model)")
    return d


def test_logits_match_transformers_on_real_prompts(real):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(real)
    tok.padding_side = "left"
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in PROMPTS]
    batch = tok(texts, return_tensors="np", padding=True)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    pos = np.clip(mask.cumsum(1) - 1, 0, None)
    ref_model = AutoModelForCausalLM.from_pretrained(real, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = ref_model(torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos)).logits.numpy()
    m = load_model(real)
    assert m.cfg.num_layers == 30 and m.cfg.tie_word_embeddings
    out = np.asarray(jax.jit(lambda p, i, a: llama.forward(p, m.cfg, i, a))(m.params, ids, mask))
    diff = np.abs(out - ref)[mask.astype(bool)]
    assert diff.max() <= 1e-3, f"max |dlogit| {diff.max():.2e}"
    # The model is coherent: greedy next tokens agree and are not degenerate.
    assert (out.argmax(-1) == ref.argmax(-1))[mask.astype(bool)].mean() > 0.99
