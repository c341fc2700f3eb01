"""Prompt techniques (scratchlm.prompts): templates, answer extraction, voting, the tree search, and the model-driven
paths on a tiny random model (SmolLM2's run is in tests/test_prompts_smollm2.py)."""

from __future__ import annotations

import json
import operator
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import tiny_llm
from scratchlm.chat import ChatTemplate
from scratchlm.errors import ConfigError, ContextLengthError
from scratchlm.prompts import (
    COT_TRIGGER,
    FewShotTemplate,
    PromptTemplate,
    best_first_search,
    chain_of_thought,
    extract_answer,
    has_final_answer,
    majority_vote,
    model_scorer,
    sample,
    select_examples,
    self_consistency,
    tree_of_thought,
)

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = [
    {"question": "Tom has 3 apples and gets 2 more. How many?", "answer": 5, "solution": "3 + 2 = 5. The answer is 5."},
    {"question": "Mia has 7 cards and gives 4 away. How many?", "answer": 3, "solution": "7 - 4 = 3. The answer is 3."},
    {"question": "4 bags of 2 shells. How many shells?", "answer": 8, "solution": "4 * 2 = 8. The answer is 8."},
]


@pytest.fixture(scope="module")
def tiny_long():
    """A tiny random model with room for few-shot prompts in its byte-level context."""
    return tiny_llm(context_length=1024)


# --- templates -------------------------------------------------------------------------------------------------
def test_prompt_template_fills_blanks_and_names_missing_ones():
    t = PromptTemplate("Q: {question}\nA: {{literal}} {question}")
    assert t.variables == ("question",)
    assert t.format(question="why?", unused=1) == "Q: why?\nA: {literal} why?"
    with pytest.raises(ConfigError, match="needs question"):
        t.format(answer="x")
    for bad in ("{", "{0}", "{}"):
        with pytest.raises(ConfigError):
            PromptTemplate(bad)


def test_few_shot_messages_pair_each_example_with_its_answer():
    fs = FewShotTemplate(EXAMPLES, input="{question}", output="The answer is {answer}.", instruction="Be brief.")
    messages = fs.messages(question="Ben has 2 coins and finds 1. How many?")
    assert [m["role"] for m in messages] == ["system"] + ["user", "assistant"] * 3 + ["user"]
    assert messages[0]["content"] == "Be brief."
    for i, example in enumerate(EXAMPLES):
        assert messages[1 + 2 * i]["content"] == example["question"]
        assert messages[2 + 2 * i]["content"] == f"The answer is {example['answer']}."
    assert messages[-1]["content"] == "Ben has 2 coins and finds 1. How many?"
    rendered = ChatTemplate(None).render(messages)  # ChatML: the examples in order, the assistant's turn open
    positions = [rendered.index(e["question"]) for e in EXAMPLES]
    assert positions == sorted(positions) and rendered.endswith("<|im_start|>assistant\n")


def test_few_shot_text_for_base_models():
    fs = FewShotTemplate(EXAMPLES[:2], input="Q: {question}", output="A: {answer}", instruction="Arithmetic.")
    assert fs.text(question="1 + 1?") == (f"Arithmetic.\n\nQ: {EXAMPLES[0]['question']}\nA: 5\n\n"
                                          f"Q: {EXAMPLES[1]['question']}\nA: 3\n\nQ: 1 + 1?\n")
    with pytest.raises(ConfigError, match="example 1 has no answer"):
        FewShotTemplate([EXAMPLES[0], {"question": "?"}], input="{question}", output="{answer}")


def test_select_examples_first_or_seeded():
    pool = [{"i": i} for i in range(10)]
    assert select_examples(pool, 3) == pool[:3]
    chosen = select_examples(pool, 4, seed=1)
    assert chosen == select_examples(pool, 4, seed=1) and len({c["i"] for c in chosen}) == 4
    assert all(c in pool for c in chosen)
    with pytest.raises(ConfigError):
        select_examples(pool, 11)


# --- chain of thought, extraction, voting ----------------------------------------------------------------------
def test_chain_of_thought_zero_and_few_shot():
    zero = chain_of_thought("What is 2 + 2?")
    assert len(zero) == 1 and zero[0]["content"].startswith("What is 2 + 2?") and COT_TRIGGER in zero[0]["content"]
    few = chain_of_thought("What is 2 + 2?", EXAMPLES)
    assert [m["content"] for m in few[2:-1:2]] == [e["solution"] for e in EXAMPLES]
    assert few[-1] == {"role": "user", "content": "What is 2 + 2?"}


@pytest.mark.parametrize("reply, expected", [
    ("3 + 5 = 8. The answer is 8.", "8"),
    ("The answer is 8, since 3 + 5 = 8 and 8 > 2", "8"),  # the announced answer, not the last number
    ("Answer: 1,250.50 dollars", "1250.5"),
    ("so she has 12 left", "12"),
    ("the answer is -3.0", "-3"),
    ("I do not know.", None),
])
def test_extract_answer_cases(reply, expected):
    assert extract_answer(reply) == expected


@settings(max_examples=60, deadline=None)
@given(st.integers(-10**7, 10**7), st.text(alphabet="abc xyz.,\n=+", max_size=30), st.integers(0, 99))
def test_extract_answer_finds_the_announced_number(value, noise, distractor):
    reply = f"{distractor} + {noise} The answer is {value:,}.{noise} {distractor}"
    assert extract_answer(reply) == str(value) and has_final_answer(reply)


def test_extract_answer_with_a_pattern():
    assert extract_answer("Choice (B) first, final choice (C)", r"\(([A-D])\)") == "C"


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(st.none(), st.sampled_from("abcd")), max_size=12))
def test_majority_vote_matches_counter(answers):
    votes = [a for a in answers if a is not None]
    expected = Counter(votes).most_common(1)[0] if votes else (None, 0)  # ties: first seen (insertion order)
    assert majority_vote(answers) == expected


# --- the tree search with a scripted scorer (search logic only) -----------------------------------------------
TREE = {(): ["a", "b"], ("a",): ["a1", "a2"], ("b",): ["b1", "b1", ""], ("a", "a1"): ["x"]}
SCORES = {"a": 0.9, "b": 0.5, "a1": 0.2, "a2": 0.3, "b1": 0.8, "x": 0.1}


def _scripted(final: set[str]):
    def propose(steps):
        return TREE.get(tuple(steps), [])

    def score(paths):
        return [SCORES[p[-1]] for p in paths]

    return propose, score, lambda steps: steps[-1] in final


def test_best_first_search_expands_the_best_open_node():
    propose, score, is_final = _scripted({"b1"})
    result = best_first_search(propose, score, is_final, breadth=3, max_expansions=10)
    assert [n.steps for n in result.expanded] == [(), ("a",), ("b",)]  # a (0.9) before b (0.5); b1 (0.8) wins
    assert result.solved and result.best.steps == ("b", "b1") and result.best.score == 0.8
    assert result.generated == 5  # duplicates and empty proposals are dropped


def test_best_first_search_budget_and_depth():
    propose, score, is_final = _scripted({"a2"})
    spent = best_first_search(propose, score, is_final, max_expansions=2)
    assert [n.steps for n in spent.expanded] == [(), ("a",)]
    assert spent.solved and spent.best.steps == ("a", "a2")  # the finished open path beats unfinished b (0.5)
    unsolved = best_first_search(propose, score, lambda s: False, max_expansions=2)
    assert not unsolved.solved and unsolved.best.steps == ("b",)
    shallow = best_first_search(propose, score, lambda s: False, max_depth=1, max_expansions=10)
    assert max(n.depth for n in shallow.expanded) == 1
    narrow = best_first_search(propose, score, lambda s: False, breadth=1, max_expansions=10)
    assert [n.steps for n in narrow.expanded] == [(), ("a",), ("a", "a1"), ("a", "a1", "x")]
    with pytest.raises(ConfigError, match="2 scores for 1"):
        best_first_search(lambda s: ["a"], lambda p: [0.1, 0.2], is_final)


# --- model-driven paths on a tiny random model ------------------------------------------------------------------
def test_sample_rows_equal_single_seeded_chats(tiny_long):
    texts = sample(tiny_long, "hello", n=3, seed=7, temperature=1.0, max_new_tokens=6)
    assert len(texts) == 3 and len(set(texts)) == 3  # one seed per sample
    for i, text in enumerate(texts):  # batching does not change what each seeded sample is
        assert text == tiny_long.chat("hello", seed=7 + i, temperature=1.0, max_new_tokens=6)
    batch = sample(tiny_long, ["hello", [{"role": "user", "content": "hello"}]], n=2, seed=7, temperature=1.0,
                   max_new_tokens=6)
    assert batch == [texts[:2], texts[:2]]
    with pytest.raises(ConfigError, match="n must be"):
        sample(tiny_long, "hello", n=0)


def test_self_consistency_votes_over_the_samples(tiny_long):
    digits = lambda text: str(sum(map(ord, text)) % 3)  # noqa: E731  an extractor that always answers
    vote = self_consistency(tiny_long, "hi", n=5, extract=digits, seed=3, max_new_tokens=4, temperature=1.0)
    assert vote.samples == sample(tiny_long, "hi", n=5, seed=3, max_new_tokens=4, temperature=1.0)
    assert vote.answers == [digits(s) for s in vote.samples]
    assert (vote.answer, vote.count) == majority_vote(vote.answers) and vote.agreement == vote.count / 5
    votes = self_consistency(tiny_long, ["hi", "ho"], n=2, seed=3, max_new_tokens=4)
    assert len(votes) == 2 and all(len(v.samples) == 2 for v in votes)
    with pytest.raises(ConfigError, match="temperature > 0"):
        self_consistency(tiny_long, "hi", temperature=0)


def test_model_scorer_reads_p_yes_from_the_full_forward_pass(tiny_long):
    paths = [("One step.",), ("One step.", "A longer second step here.")]
    scores = model_scorer(tiny_long, "What is 1 + 1?")(paths)
    tok = tiny_long.tokenizer
    yes = sorted({tok.encode("Yes")[0], tok.encode("yes")[0]})
    no = sorted({tok.encode("No")[0], tok.encode("no")[0]})
    for path, got in zip(paths, scores):  # reference: one unbatched forward pass per prompt
        ids = tiny_long.encode_chat([{"role": "user", "content": "Problem: What is 1 + 1?\nPartial solution: "
                                      f"{' '.join(path)}\nIs every step of this partial solution correct? "
                                      "Answer yes or no."}])
        with torch.inference_mode():
            probs = tiny_long.model(torch.tensor([ids]))[0, -1].float().softmax(-1)
        assert got == pytest.approx(float(probs[yes].sum() / (probs[yes].sum() + probs[no].sum())), abs=1e-5)


def test_tree_of_thought_on_a_tiny_model(tiny_long):
    result = tree_of_thought(tiny_long, "What is 1 + 1?", EXAMPLES[:1], breadth=2, max_expansions=3, seed=0,
                             max_step_tokens=6)
    search = result.search
    assert 1 <= len(search.expanded) <= 3 and search.generated <= 3 * 2
    assert all(0.0 <= n.score <= 1.0 for n in search.expanded[1:]) and 0.0 <= search.best.score <= 1.0
    assert result.answer == extract_answer(search.best.text)
    with pytest.raises(ContextLengthError, match="context window"):
        tree_of_thought(tiny_llm(), "x" * 200, breadth=1, max_expansions=2, max_step_tokens=2)


# --- the offline task -------------------------------------------------------------------------------------------
def test_make_word_problems_is_seeded_and_holds_out_the_test_split(tmp_path):
    script = ROOT / "scripts" / "make_word_problems.py"
    subprocess.run([sys.executable, str(script), "--out", str(tmp_path)], check=True, capture_output=True)
    for split in ("train", "test"):  # the committed files are what the script writes
        committed = ROOT / "benchmarks" / "data" / f"word_problems_{split}.jsonl"
        assert (tmp_path / committed.name).read_bytes() == committed.read_bytes()
    train = [json.loads(line) for line in (tmp_path / "word_problems_train.jsonl").open()]
    test = [json.loads(line) for line in (tmp_path / "word_problems_test.jsonl").open()]
    assert not {p["question"] for p in train} & {p["question"] for p in test}
    operations = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.floordiv}
    for p in train + test:  # every worked solution ends with its answer, and its arithmetic is right
        assert extract_answer(p["solution"]) == str(p["answer"])
        equations = re.findall(r"(\d+) ([-+*/]) (\d+) = (\d+)", p["solution"])
        assert len(equations) == p["steps"]
        assert all(operations[op](int(a), int(b)) == int(c) for a, op, b, c in equations)
