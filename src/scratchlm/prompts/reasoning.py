"""Chain-of-thought prompting, answer extraction, and self-consistency (several samples, majority vote).

    messages = chain_of_thought("Tom has 3 apples ...")              # zero-shot: "Let's think step by step."
    reply = llm.chat(messages, temperature=0)
    extract_answer(reply)                                            # "8"
    vote = self_consistency(llm, messages, n=5, seed=0)              # five samples, one vote each
    vote.answer, vote.count, vote.answers

- Chain of thought: Wei et al. 2022 ("Chain-of-Thought Prompting Elicits Reasoning in Large Language Models")
  show worked solutions as few-shot examples; Kojima et al. 2022 ("Large Language Models are Zero-Shot Reasoners")
  add only "Let's think step by step." Both gain on large models; the paper reports that small ones do not.
- Self-consistency: Wang et al. 2022 sample several reasoning paths at a temperature and take the most common
  final answer instead of the one greedy path.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from scratchlm.errors import ConfigError
from scratchlm.prompts.templates import FewShotTemplate

COT_TRIGGER = "Let's think step by step."  # Kojima et al. 2022, Table 4: the best of the triggers tried
ANSWER_FORMAT = 'End with "The answer is N."'

_NUMBER = r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
# The phrases a model uses to announce its final answer, most explicit first ("The answer is 8", "Answer: 8").
_ANSWER_PHRASES = [re.compile(rf"answer\s+is\s*:?\s*\$?\s*({_NUMBER})", re.IGNORECASE),
                   re.compile(rf"answer\s*:\s*\$?\s*({_NUMBER})", re.IGNORECASE)]
_ANY_NUMBER = re.compile(_NUMBER)


def normalize_number(text: str) -> str:
    """A number as one canonical string: no thousands commas or plus sign, no trailing ``.0`` ("1,200.0" ->
    "1200")."""
    text = text.replace(",", "").lstrip("+")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def extract_answer(text: str, pattern: str | re.Pattern | None = None) -> str | None:
    """The final answer in a model's reply, or None when there is none.

    Numbers by default: the last "the answer is N" / "Answer: N" if there is one (a model may restate the
    question's numbers after it), else the last number in the text; normalized (``normalize_number``). A
    ``pattern`` (a regular expression with one group) extracts anything else: its last match's group, stripped.
    """
    if pattern is not None:
        matches = list(re.finditer(pattern, text))
        return matches[-1].group(1).strip() if matches else None
    for phrase in _ANSWER_PHRASES:
        matches = phrase.findall(text)
        if matches:
            return normalize_number(matches[-1])
    numbers = _ANY_NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def has_final_answer(text: str) -> bool:
    """Whether ``text`` announces a final answer ("the answer is N", "Answer: N")."""
    return any(phrase.search(text) for phrase in _ANSWER_PHRASES)


def chain_of_thought(question: str, examples: Sequence[dict] | None = None, question_key: str = "question",
                     solution_key: str = "solution", instruction: str | None = None) -> list[dict]:
    """Chat messages asking for step-by-step reasoning that ends with "The answer is N.".

    Without ``examples``: zero-shot chain of thought (the question, then ``COT_TRIGGER``). With ``examples``
    (dicts with ``question_key`` and ``solution_key``, the solution worked out step by step): few-shot chain of
    thought, each example a user turn and its solution the assistant's reply.
    """
    if not examples:
        content = f"{question}\n{COT_TRIGGER} {ANSWER_FORMAT}"
        return ([{"role": "system", "content": instruction}] if instruction else []) + \
            [{"role": "user", "content": content}]
    template = FewShotTemplate(examples, input=f"{{{question_key}}}", output=f"{{{solution_key}}}",
                               instruction=instruction or f"Solve each problem step by step. {ANSWER_FORMAT}")
    return template.messages(**{question_key: question})


def majority_vote(answers: Sequence[str | None]) -> tuple[str | None, int]:
    """The most common answer and its count; None answers (nothing extracted) do not vote. Ties go to the answer
    seen first, so the result does not depend on hashing. ``(None, 0)`` when nobody voted."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None, 0
    best = max(counts.values())
    winner = next(a for a in answers if a is not None and counts[a] == best)
    return winner, best


@dataclass
class Vote:
    """The outcome of self-consistency for one prompt."""

    answer: str | None  # the majority answer (None when no sample had one)
    count: int  # how many samples gave it
    answers: list[str | None] = field(default_factory=list)  # each sample's extracted answer
    samples: list[str] = field(default_factory=list)  # each sample's text

    @property
    def agreement(self) -> float:
        """The share of samples that gave the majority answer (a confidence estimate, Wang et al. 2022 §4)."""
        return self.count / len(self.samples) if self.samples else 0.0


def generate_rows(llm, rows: Sequence[tuple]) -> list:
    """Complete ``(prompt, SamplingParams)`` rows together in one batch; a ``Completion`` per row. Unlike
    ``LLM.complete``, every row has its own sampling settings (its own seed, above all)."""
    from scratchlm.generate import stream_sequences

    seqs = [seq for prompt, params in rows for seq in llm.sequences([prompt], params)]
    for _ in stream_sequences(llm.model, seqs):
        pass
    return [s.completion() for s in seqs]


def _is_one_prompt(prompt) -> bool:
    from scratchlm.llm import _is_ids, _is_messages

    return isinstance(prompt, str) or _is_messages(prompt) or _is_ids(prompt)


def sample(llm, prompt, n: int, seed: int | None = None, **sampling) -> list[str] | list[list[str]]:
    """``n`` sampled completions of one prompt (a list of texts), or of each prompt of a batch (a list of lists),
    decoded together in one batch. Sample ``i`` uses ``seed + i`` (reproducible, and different from each other:
    one seed for all would give ``n`` copies); ``seed=None`` draws fresh randomness. A string is one user
    message, as ``LLM.chat`` takes it; ``sampling`` as ``LLM.chat``.

    The in-process counterpart of the server's ``n`` (``/v1/chat/completions`` with ``"n": 5``)."""
    from scratchlm.llm import _conversation

    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConfigError(f"n must be an integer >= 1, got {n!r}")
    one = _is_one_prompt(prompt)
    prompts = [prompt] if one else list(prompt)
    if not prompts:
        raise ConfigError("give a prompt, or a non-empty list of prompts")
    rows = [(_conversation(p) if isinstance(p, str) else p,
             llm.sampling(**sampling, seed=None if seed is None else seed + i)) for p in prompts for i in range(n)]
    texts = [c.text for c in generate_rows(llm, rows)]
    groups = [texts[j * n:(j + 1) * n] for j in range(len(prompts))]
    return groups[0] if one else groups


def self_consistency(llm, prompt, n: int = 5, extract: Callable[[str], str | None] = extract_answer,
                     temperature: float = 0.7, seed: int | None = None, **sampling) -> Vote | list[Vote]:
    """Sample ``n`` reasoning paths at ``temperature`` and vote on their extracted answers (Wang et al. 2022).

    ``prompt`` is a conversation (e.g. from ``chain_of_thought``), a string (one user message), or a list of
    those (a batch: a list of Votes). ``extract`` maps a reply to its answer (None: no vote)."""
    if temperature <= 0:
        raise ConfigError("self-consistency needs temperature > 0: greedy decoding gives n identical samples")
    one = _is_one_prompt(prompt)
    result = sample(llm, prompt, n, seed=seed, temperature=temperature, **sampling)
    votes = []
    for texts in ([result] if one else result):
        answers = [extract(t) for t in texts]
        answer, count = majority_vote(answers)
        votes.append(Vote(answer, count, answers, list(texts)))
    return votes[0] if one else votes
