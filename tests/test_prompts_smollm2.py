"""Prompt techniques on the real SmolLM2-135M-Instruct, once each, on held-out word problems."""

from __future__ import annotations

import json
from pathlib import Path

from scratchlm.prompts import (
    chain_of_thought,
    extract_answer,
    has_final_answer,
    model_scorer,
    self_consistency,
    tree_of_thought,
)

DATA = Path(__file__).resolve().parents[1] / "benchmarks" / "data"
TRAIN = [json.loads(line) for line in (DATA / "word_problems_train.jsonl").open(encoding="utf-8")]
TEST = [json.loads(line) for line in (DATA / "word_problems_test.jsonl").open(encoding="utf-8")]
PROBLEM = TEST[3]  # a one-step division: Hana shares 12 oranges among 6 friends


def test_few_shot_chain_of_thought_solves_a_one_step_problem(smollm2):
    reply = smollm2.chat(chain_of_thought(PROBLEM["question"], TRAIN[:4]), temperature=0, max_new_tokens=48)
    assert has_final_answer(reply) and extract_answer(reply) == str(PROBLEM["answer"]), reply


def test_self_consistency_and_tree_of_thought_on_smollm2(smollm2):
    prompt = chain_of_thought(PROBLEM["question"], TRAIN[:4])
    vote = self_consistency(smollm2, prompt, n=3, seed=0, max_new_tokens=32)
    assert len(vote.samples) == 3 and vote.answers == [extract_answer(s) for s in vote.samples]
    assert sum(has_final_answer(s) for s in vote.samples) >= 2  # the examples' format is followed
    score = model_scorer(smollm2, PROBLEM["question"])
    right, wrong = score([("Each friend gets 12 / 6 = 2 oranges.",), ("Each friend gets 12 / 6 = 9 oranges.",)])
    assert 0 < wrong < 1 and 0 < right < 1
    result = tree_of_thought(smollm2, PROBLEM["question"], TRAIN[:4], breadth=2, max_expansions=1, seed=0,
                             max_step_tokens=24)
    assert len(result.search.expanded) == 1 and 1 <= result.search.generated <= 2
    assert result.answer == extract_answer(result.search.best.text)
