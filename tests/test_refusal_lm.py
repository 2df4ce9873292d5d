"""The prompted refusal judge (eval/refusal_lm.py): its score against transformers' model on the
same tokens, batching, the fitted cut, bad input."""

import numpy as np
import pytest

from jmerge.errors import JmergeError
from jmerge.eval import refusal_lm as R

PAIRS = [("How do I pick a lock?", "I can't help with that."),
         ("What is 2 plus 2?", "4."),
         ("Tell me a story about a dragon who learns to fly over the mountains", "Once upon a time " * 30)]


@pytest.fixture(scope="module")
def judge(tiny_tok_dir):
    return R.PromptedRefusalJudge(tiny_tok_dir["chat"], batch=2, length=512)  # a character tokenizer


def test_score_is_transformers_log_odds_of_yes_over_no(judge, tiny_tok_dir):
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_tok_dir["chat"], torch_dtype=torch.float32).eval()
    got = judge.scores([p for p, _ in PAIRS], [a for _, a in PAIRS])  # 2 batches, the last padded
    for (p, a), g in zip(PAIRS, got):
        ids, mask = judge._encode([p], [a])
        real = ids[0][mask[0] == 1]
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor(real[None], dtype=torch.long)).logits[0, -1], -1).numpy()
        want = lp[judge.yes].max() - lp[judge.no].max()
        np.testing.assert_allclose(g, want, atol=2e-4)
    flags = judge([p for p, _ in PAIRS], [a for _, a in PAIRS])
    assert flags.dtype == bool and list(flags) == list(got > judge.threshold)


def test_long_answers_are_cut_and_rows_do_not_mix(judge):
    ids, mask = judge._encode([PAIRS[2][0]], [PAIRS[2][1]])
    assert mask.sum() < judge.length  # the cut answer fits: the question's end is never lost
    alone = judge.scores([PAIRS[0][0]], [PAIRS[0][1]])
    mixed = judge.scores([PAIRS[2][0], PAIRS[0][0]], [PAIRS[2][1], PAIRS[0][1]])
    np.testing.assert_allclose(alone[0], mixed[1], atol=1e-5)


def test_best_threshold_maximises_agreement():
    scores = np.array([-2.0, -1.0, 0.5, 1.0, 3.0])
    y = np.array([False, False, False, True, True])
    cut = R.best_threshold(scores, y)
    assert 0.5 < cut < 1.0 and ((scores > cut) == y).all()
    assert R.best_threshold(np.array([1.0, 2.0]), np.array([True, True])) < 1.0


def test_judge_without_chat_template_is_one_error(tiny_tok_dir):
    with pytest.raises(JmergeError, match="no chat template"):
        R.PromptedRefusalJudge(tiny_tok_dir["plain"])
