"""Tree of thoughts: propose next reasoning steps, score partial solutions with the model, expand the best first.

    result = tree_of_thought(llm, "Ben has 16 balloons ...", examples=train[:4], breadth=3, max_expansions=6)
    result.answer, result.search.best.steps, result.search.expanded

Yao et al. 2023 ("Tree of Thoughts: Deliberate Problem Solving with Large Language Models") treat each
intermediate step of a solution as a node: a *proposer* writes candidate next steps (§3.2, "propose prompt"), an
*evaluator* values each partial solution with the model itself (§3.3, "value each state independently"), and a
search (BFS or DFS there; best-first here, as in their §2's heuristic-search framing) decides which node to grow.
Our evaluator asks the model whether the steps so far are correct and reads the probability of "yes" from the next-
token distribution (P(True), Kadavath et al. 2022), a smooth score where the paper samples "sure/likely/impossible".

``best_first_search`` is the search alone: it knows nothing of models and takes any ``propose`` and ``score``.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from scratchlm.errors import ConfigError, ContextLengthError
from scratchlm.prompts.reasoning import chain_of_thought, extract_answer, generate_rows, has_final_answer

Steps = tuple[str, ...]
STEP_STOPS = (". ", ".\n", "\n")  # one thought = one sentence or line ("2.5" has no space after its dot)
VALUE_QUESTION = "Is every step of this partial solution correct? Answer yes or no."


@dataclass(frozen=True)
class Thought:
    """A node of the tree: the reasoning steps from the root, and the evaluator's score of them (higher: better)."""

    steps: Steps
    score: float

    @property
    def depth(self) -> int:
        return len(self.steps)

    @property
    def text(self) -> str:
        return " ".join(self.steps)


@dataclass
class SearchResult:
    """The chosen path (``best``), whether it is a finished solution, and the search's history."""

    best: Thought
    solved: bool
    expanded: list[Thought] = field(default_factory=list)  # in the order they were grown
    generated: int = 0  # thoughts proposed and scored


def best_first_search(propose: Callable[[Steps], Sequence[str]], score: Callable[[list[Steps]], Sequence[float]],
                      is_final: Callable[[Steps], bool], breadth: int = 3, max_expansions: int = 6,
                      max_depth: int = 4, root: Steps = ()) -> SearchResult:
    """Grow the highest-scoring open node until a finished one is the best open node, or the budget is spent.

    ``propose(steps)`` returns candidate next steps (the first ``breadth`` distinct non-empty ones are kept);
    ``score(paths)`` scores a list of paths at once (a model batches them); ``is_final(steps)`` says a path is a
    finished solution. A finished path is returned when it is popped as the best open node, so a better-scored
    unfinished path is grown first. When ``max_expansions`` runs out, the best finished open path wins, else the
    best open path (``solved`` False). Ties go to the node made first.
    """
    if breadth < 1 or max_expansions < 1 or max_depth < 1:
        raise ConfigError("tree search needs breadth, max_expansions and max_depth of at least 1")
    order = itertools.count()
    frontier: list[tuple[float, int, Thought]] = [(0.0, next(order), Thought(tuple(root), 0.0))]
    expanded: list[Thought] = []
    generated = 0
    while frontier and len(expanded) < max_expansions:
        _, _, node = heapq.heappop(frontier)
        if node.steps and is_final(node.steps):
            return SearchResult(node, True, expanded, generated)
        expanded.append(node)
        if node.depth >= max_depth:
            continue
        candidates = list(dict.fromkeys(s.strip() for s in propose(node.steps) if s and s.strip()))[:breadth]
        if not candidates:
            continue
        paths = [node.steps + (c,) for c in candidates]
        scores = list(score(paths))
        if len(scores) != len(paths):
            raise ConfigError(f"the scorer returned {len(scores)} scores for {len(paths)} paths")
        generated += len(paths)
        for path, value in zip(paths, scores):
            heapq.heappush(frontier, (-float(value), next(order), Thought(path, float(value))))
    open_nodes = [node for _, _, node in sorted(frontier)]
    finished = [n for n in open_nodes if n.steps and is_final(n.steps)]
    if finished:
        return SearchResult(finished[0], True, expanded, generated)
    best = open_nodes[0] if open_nodes else max(expanded, key=lambda n: (n.score, n.depth))
    return SearchResult(best, False, expanded, generated)


# ------------------------------------------------------------------------------------------------------------------
def model_proposer(llm, question: str, examples: Sequence[dict] | None = None, breadth: int = 3,
                   temperature: float = 0.7, seed: int | None = None, max_step_tokens: int = 48,
                   **sampling) -> Callable[[Steps], list[str]]:
    """``propose(steps)``: ``breadth`` sampled next sentences of the chain-of-thought answer that continues
    ``steps`` (the steps so far are put in the assistant's turn, and the model writes on from there)."""
    prefix = llm.template.render(chain_of_thought(question, examples))
    calls = itertools.count()

    def propose(steps: Steps) -> list[str]:
        ids = llm.tokenizer.encode(prefix + "".join(s + " " for s in steps), allowed_special="all")
        first = None if seed is None else seed + breadth * next(calls)
        rows = [(ids, llm.sampling(**{"temperature": temperature, "max_new_tokens": max_step_tokens,
                                      "stop": STEP_STOPS, **sampling},
                                   seed=None if first is None else first + i)) for i in range(breadth)]
        steps_out = []
        for completion in generate_rows(llm, rows):
            text = completion.text.strip()
            if text and not text.endswith((".", "!", "?")):
                text += "."  # the stop string took the sentence's full stop
            steps_out.append(text)
        return steps_out

    return propose


def _first_token_ids(tokenizer, words: Sequence[str]) -> list[int]:
    return sorted({tokenizer.encode(w)[0] for w in words})


def model_scorer(llm, question: str) -> Callable[[list[Steps]], list[float]]:
    """``score(paths)``: for each path, P(yes) / (P(yes) + P(no)) for the model's first answer token when asked
    whether the steps are correct (one batched forward pass over the value prompts; no tokens generated)."""
    from scratchlm.generate import prefill
    from scratchlm.model import KVCache

    yes = _first_token_ids(llm.tokenizer, ["Yes", "yes"])
    no = _first_token_ids(llm.tokenizer, ["No", "no"])

    def score(paths: list[Steps]) -> list[float]:
        prompts = [llm.encode_chat([{"role": "user", "content": f"Problem: {question}\n"
                                     f"Partial solution: {' '.join(p)}\n{VALUE_QUESTION}"}]) for p in paths]
        longest = max(map(len, prompts))
        if longest > llm.config.context_length:
            raise ContextLengthError(f"a value prompt of {longest} tokens does not fit the context window of "
                                     f"{llm.config.context_length} tokens: shorten the question or max_depth")
        param = next(llm.model.parameters())
        cache = KVCache(llm.config, len(prompts), max_len=longest, dtype=param.dtype,
                        device=param.device)
        with torch.inference_mode():
            probs = prefill(llm.model, prompts, cache).softmax(-1)  # (B, V)
        p_yes, p_no = probs[:, yes].sum(-1), probs[:, no].sum(-1)
        return (p_yes / (p_yes + p_no).clamp_min(1e-12)).tolist()

    return score


@dataclass
class TreeResult:
    """Tree-of-thought's answer (extracted from the chosen path) and the search behind it."""

    answer: str | None
    search: SearchResult


def tree_of_thought(llm, question: str, examples: Sequence[dict] | None = None, breadth: int = 3,
                    max_expansions: int = 6, max_depth: int = 4, temperature: float = 0.7, seed: int | None = None,
                    max_step_tokens: int = 48, extract: Callable[[str], str | None] = extract_answer,
                    **sampling) -> TreeResult:
    """Solve ``question`` by best-first search over reasoning steps, with the model as proposer and evaluator.

    ``examples`` (dicts with "question" and "solution") make the proposer's prompt few-shot chain of thought. A path
    is finished when its last step announces the answer ("The answer is N"). Cost: at most ``max_expansions`` x
    ``breadth`` sampled steps of ``max_step_tokens`` tokens each, and as many scoring forward passes.
    """
    propose = model_proposer(llm, question, examples, breadth, temperature, seed, max_step_tokens, **sampling)
    search = best_first_search(propose,
                               model_scorer(llm, question), lambda steps: has_final_answer(steps[-1]),
                               breadth=breadth, max_expansions=max_expansions, max_depth=max_depth)
    return TreeResult(extract(search.best.text), search)
