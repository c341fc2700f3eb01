"""Summaries of documents longer than the model's context: map-reduce and refine.

- **map-reduce**: summarize each part on its own (map), then summarize the concatenated summaries (reduce),
  again in groups if they still do not fit; parts are independent, so the map step can be batched;
- **refine**: summarize the first part, then for each next part ask the model to refine the running summary
  with it; one pass in order, better at following a story, one call per part in sequence.

Both are the chains LangChain calls ``map_reduce`` and ``refine``. The parts are cut by ``chunking`` at paragraph
and sentence boundaries, sized by the chat model's own tokenizer so that each prompt fits its context.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from scratchlm.progress import bar
from scratchlm.rag.chunking import chunk_text
from scratchlm.rag.documents import read_document

METHODS = ("map-reduce", "refine")
MAP_PROMPT = "Summarize the following text in a few sentences.\n\nText:\n{text}"
REDUCE_PROMPT = "These are summaries of consecutive parts of one document. Combine them into one summary.\n\n{text}"
REFINE_PROMPT = ("Here is a summary of the beginning of a document:\n{summary}\n\nHere is the next part:\n{text}\n\n"
                 "Rewrite the summary so that it also covers the next part. Keep it to a few sentences.")


def _reply(llm, prompt: str, max_new_tokens: int, **sampling) -> str:
    return llm.chat(prompt, **{"temperature": 0.0, **sampling, "max_new_tokens": max_new_tokens}).strip()


def split_for_context(llm, text: str, max_new_tokens: int, reserve: int, part_tokens: int | None = None) -> list[str]:
    """``text`` cut into parts that leave ``reserve`` tokens (prompt, running summary) and the answer free."""
    room = llm.config.context_length - max_new_tokens - reserve
    budget = min(part_tokens or room, room)
    if budget < 16:
        raise ValueError(f"{llm.config.context_length} tokens of context leave no room for the text; "
                         f"lower max_new_tokens")
    count = lambda s: len(llm.tokenizer.encode(s))  # noqa: E731
    return [c.text for c in chunk_text(text, count, budget, 0)]


def summarize_text(llm, text: str, method: str = "map-reduce", max_new_tokens: int = 200,
                   part_tokens: int | None = None, progress: bool = False,
                   on_step: Callable[[str, int, int], None] | None = None, **sampling) -> str:
    """A summary of ``text`` of any length with the chat model ``llm`` (``method``: map-reduce or refine)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, not {method!r}")
    overhead = len(llm.encode_chat([{"role": "user", "content": REFINE_PROMPT.format(summary="", text="")}])) + 8
    if method == "refine":
        parts = split_for_context(llm, text, max_new_tokens, overhead + max_new_tokens, part_tokens)
        summary = ""
        for i, part in enumerate(bar(parts, "refining", progress, unit="part")):
            prompt = (MAP_PROMPT.format(text=part) if i == 0
                      else REFINE_PROMPT.format(summary=summary, text=part))
            summary = _reply(llm, prompt, max_new_tokens, **sampling)
            if on_step:
                on_step("refine", i + 1, len(parts))
        return summary
    parts = split_for_context(llm, text, max_new_tokens, overhead, part_tokens)
    summaries = [_reply(llm, MAP_PROMPT.format(text=p), max_new_tokens, **sampling)
                 for p in bar(parts, "map", progress, unit="part")]
    if on_step:
        on_step("map", len(parts), len(parts))
    # Reduce in groups that fit, until one summary is left.
    while len(summaries) > 1:
        groups = split_for_context(llm, "\n\n".join(summaries), max_new_tokens, overhead, part_tokens)
        if len(groups) >= len(summaries):  # the summaries do not shrink: pair them up to make progress
            groups = ["\n\n".join(summaries[i:i + 2]) for i in range(0, len(summaries), 2)]
        summaries = [_reply(llm, REDUCE_PROMPT.format(text=g), max_new_tokens, **sampling)
                     for g in bar(groups, "reduce", progress, unit="part")]
        if on_step:
            on_step("reduce", len(groups), len(groups))
    return summaries[0]


def summarize(llm, path: str | Path, method: str = "map-reduce", **kwargs) -> str:
    """A summary of the document at ``path`` (any format ``documents`` reads)."""
    doc = read_document(path)
    text = "\n\n".join(p.text for p in doc.pages)
    if not text.strip():
        from scratchlm.rag.documents import DocumentError

        raise DocumentError(f"{path}: empty (nothing to summarize)")
    return summarize_text(llm, text, method, **kwargs)
