"""Answers with citations: retrieve, number the passages in the prompt, let the chat model answer citing them.

    answer = ask(store, encoder, llm, "When was the bridge rebuilt?")
    print(answer.text)                     # "... rebuilt in 1871 [2]."
    for n, hit in answer.cited: print(f"[{n}] {hit.citation()}")

The prompt holds as many retrieved passages as fit in the model's context after room for the question, the
instructions and the answer (``max_new_tokens``); the last one that fits partly is cut at a token. Citations
``[n]`` in the answer that name no passage given are listed in ``Answer.unknown_citations`` (a small model
invents them). When no passage is similar enough to the question (cosine below ``min_similarity``, and no
keyword match in keyword mode) the model is not asked: the answer is :data:`NOT_FOUND`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from scratchlm.rag.search import Hit, search
from scratchlm.rag.store import Embedder, Store

NOT_FOUND = "I could not find this in the documents."
DEFAULT_MIN_SIMILARITY = 0.25  # all-MiniLM-L6-v2: unrelated texts score ~0-0.15, related ones 0.3 and more

SYSTEM = ("You answer questions using only the numbered passages the user gives. After each statement, cite the "
          "passages it comes from by number, like [1] or [2][3]. If the passages do not contain the answer, say "
          f'"{NOT_FOUND}"')


@dataclass
class Answer:
    question: str
    text: str
    passages: list[Hit] = field(default_factory=list)  # passage n is passages[n - 1]
    found: bool = True

    @property
    def citation_numbers(self) -> list[int]:
        """The passage numbers cited in the answer, in order of first citation."""
        seen: dict[int, None] = {}
        for group in re.findall(r"\[(\d+(?:\s*[,;]\s*\d+)*)\]", self.text):
            for n in re.split(r"\s*[,;]\s*", group):
                seen.setdefault(int(n), None)
        return list(seen)

    @property
    def cited(self) -> list[tuple[int, Hit]]:
        """(number, passage) for each valid citation."""
        return [(n, self.passages[n - 1]) for n in self.citation_numbers if 1 <= n <= len(self.passages)]

    @property
    def unknown_citations(self) -> list[int]:
        """Citation numbers that name no passage given to the model."""
        return [n for n in self.citation_numbers if not 1 <= n <= len(self.passages)]

    def sources(self, cwd: str | None = None) -> str:
        """The cited sources, one per line: ``[2] docs/guide.pdf p. 7``; unknown citations flagged."""
        lines = [f"[{n}] {hit.citation(cwd)}" for n, hit in self.cited]
        lines += [f"[{n}] (no such passage: the model cited a passage it was not given)"
                  for n in self.unknown_citations]
        return "\n".join(lines)


def format_passage(n: int, hit: Hit) -> str:
    # Number and text only: a small model copies a header such as "(docs/a.md, Setup)" into its answer.
    return f"[{n}] {hit.text.strip()}"


def build_messages(llm, question: str, hits: list[Hit], max_new_tokens: int) -> tuple[list[dict], list[Hit]]:
    """The chat messages with as many numbered passages as fit the model's context, and the passages used."""
    tok = llm.tokenizer

    def messages(body: str) -> list[dict]:
        return [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": f"Passages:\n\n{body}\n\nQuestion: {question}"}]

    budget = llm.config.context_length - max_new_tokens - len(llm.encode_chat(messages("")))
    parts, used = [], []
    for hit in hits:
        text = format_passage(len(used) + 1, hit)
        cost = len(tok.encode("\n\n" + text))
        if cost <= budget:
            parts.append(text)
            used.append(hit)
            budget -= cost
            continue
        if budget > 48:  # a useful part of the passage still fits: cut it at a token
            ids = tok.encode(text)[:budget - 8]
            parts.append(tok.decode(ids) + " ...")
            used.append(hit)
        break
    if not used:
        raise ValueError(f"the question leaves no room for passages in {llm.config.context_length} tokens; "
                         f"ask a shorter question or lower max_new_tokens")
    return messages("\n\n".join(parts)), used


def ask(store: Store, embedder: Embedder, llm, question: str, k: int = 5, mode: str = "hybrid",
        where: str | None = None, min_similarity: float = DEFAULT_MIN_SIMILARITY, max_new_tokens: int = 256,
        on_text: Callable[[str], None] | None = None, rerank=None, warn: Callable[[str], None] | None = None,
        **sampling) -> Answer:
    """Answer ``question`` from the store with the chat model ``llm``; ``on_text`` receives the answer as it is
    generated. Greedy decoding unless ``temperature`` is given."""
    hits = search(store, embedder, question, k=k, mode=mode, where=where, rerank=rerank, warn=warn)
    if mode == "keyword":
        found = bool(hits)
    else:
        found = any(h.dense_score is not None and h.dense_score >= min_similarity for h in hits)
    # Passages far from the question in meaning only distract a small model; keep those that are close, and
    # exact keyword matches the dense index did not rank at all (codes, names).
    if mode != "keyword":
        hits = [h for h in hits if h.dense_score is None or h.dense_score >= min_similarity]
    if not found:
        if on_text:
            on_text(NOT_FOUND)
        return Answer(question, NOT_FOUND, [], found=False)
    messages, used = build_messages(llm, question, hits, max_new_tokens)
    sampling = {"temperature": 0.0, **sampling, "max_new_tokens": max_new_tokens}
    parts = []
    for piece in llm.stream(messages, **sampling):
        parts.append(piece)
        if on_text:
            on_text(piece)
    return Answer(question, "".join(parts).strip(), used)
