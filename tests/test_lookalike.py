"""The look-alike search set (configs/data): benign prompts with dangerous-sounding words, written
for jmerge, with the base model's answers. XSTest is the held-out over-refusal measure, so the set
must not contain its prompts, nor near-copies of them."""

import json
import re
from pathlib import Path

from conftest import data_dir, needs_data
from jmerge import data

ROOT = Path(__file__).resolve().parents[1] / "configs" / "data"
XSTEST = "xstest/xstest_prompts.csv"


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z']+", text.lower()))


def test_rows_are_the_prompt_list_with_answers():
    prompts = [line.strip() for line in (ROOT / "lookalike_prompts.txt").read_text().splitlines() if line.strip()]
    rows = data.read_pairs(ROOT / "lookalike_base.jsonl")
    assert len(set(prompts)) == len(prompts) >= 80
    assert {r["prompt"] for r in rows} <= set(prompts) and len(rows) >= len(prompts) - 5
    assert all(r["source"] == "lookalike:base" for r in rows)


@needs_data(XSTEST)  # XSTest is dev data, not shipped
def test_disjoint_from_xstest():
    import csv
    xs = [r["prompt"] for r in csv.DictReader((data_dir() / XSTEST).read_text().splitlines())]
    rows = [json.loads(line) for line in (ROOT / "lookalike_base.jsonl").read_text().splitlines()]
    for r in rows:
        mine = words(r["prompt"])
        closest = max(len(mine & words(x)) / len(mine | words(x)) for x in xs)
        assert closest < 0.6, r["prompt"]
