"""Prompt techniques: few-shot templates, chain of thought, self-consistency and tree of thoughts.

    from scratchlm.prompts import FewShotTemplate, chain_of_thought, extract_answer, self_consistency, tree_of_thought

    reply = llm.chat(chain_of_thought("Tom has 3 apples. He gets 5 more. How many does he have?"), temperature=0)
    extract_answer(reply)                                   # the number after "The answer is", else the last one
    self_consistency(llm, chain_of_thought(q), n=5).answer  # majority vote over five samples
    tree_of_thought(llm, q, examples=pool[:4]).answer       # best-first search, steps scored by the model

Modules, one concept each: ``templates`` (prompt templates, few-shot), ``reasoning`` (chain of thought, answer
extraction, sampling n, self-consistency), ``tree`` (tree-of-thought search). Measured on SmolLM2-135M with
``benchmarks/prompts.py`` (docs/agents.md).
"""

from scratchlm.prompts.reasoning import (
    COT_TRIGGER,
    Vote,
    chain_of_thought,
    extract_answer,
    has_final_answer,
    majority_vote,
    normalize_number,
    sample,
    self_consistency,
)
from scratchlm.prompts.templates import FewShotTemplate, PromptTemplate, select_examples
from scratchlm.prompts.tree import (
    SearchResult,
    Thought,
    TreeResult,
    best_first_search,
    model_proposer,
    model_scorer,
    tree_of_thought,
)

__all__ = ["COT_TRIGGER", "FewShotTemplate", "PromptTemplate", "SearchResult", "Thought", "TreeResult", "Vote",
           "best_first_search", "chain_of_thought", "extract_answer", "has_final_answer", "majority_vote",
           "model_proposer", "model_scorer", "normalize_number", "sample", "select_examples", "self_consistency",
           "tree_of_thought"]
