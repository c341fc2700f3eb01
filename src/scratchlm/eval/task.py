"""Task evaluation: generate an answer for every example of a JSONL file and score it against the reference.

The file has the fine-tuning layout (``{"messages": [...]}`` or ``{"prompt", "completion"}``): the
messages before the last assistant turn are the prompt, that turn's content is the reference. Answers
are greedy (temperature 0), so a score is reproducible; examples are generated in batches.

    result = evaluate_task(LLM.load("smollm2-135m-instruct", adapter="runs/task/best"), "task/test.jsonl")
    result.scores   # {"exact_match": ..., "token_f1": ..., "bleu": ..., "rouge_l": ...}
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from scratchlm.eval.metrics import score_all


@dataclass
class TaskResult:
    """Scores over ``n`` examples, and each example's prompt, reference and prediction."""

    n: int
    scores: dict[str, float]
    rows: list[dict] = field(default_factory=list)

    def summary(self) -> str:
        s = self.scores
        return (f"exact match {s['exact_match']:.4f}  token F1 {s['token_f1']:.4f}  BLEU {s['bleu']:.2f}  "
                f"ROUGE-L {s['rouge_l']:.4f}  ({self.n} examples)")


def read_task(path: str | os.PathLike, limit: int | None = None) -> list[tuple[list[dict], str]]:
    """(prompt messages, reference answer) pairs of a task file; bad lines fail with their line number."""
    from scratchlm.finetune.data import read_jsonl, to_messages

    pairs = []
    for number, record in read_jsonl(path):
        messages = to_messages(record, f"{path}, line {number}")
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        pairs.append((messages[:last], messages[last]["content"]))
        if limit is not None and len(pairs) >= limit:
            break
    return pairs


def evaluate_task(llm, path: str | os.PathLike, max_new_tokens: int | None = None, batch_size: int = 16,
                  limit: int | None = None, progress: bool = False) -> TaskResult:
    """Greedy answers to every prompt of ``path``, scored by exact match, token F1, BLEU and ROUGE-L.

    ``max_new_tokens`` defaults to the longest reference in tokens plus 16 (enough to see an answer
    that runs on, without paying for long rambles).
    """
    pairs = read_task(Path(path), limit)
    if max_new_tokens is None:
        longest = max(len(llm.tokenizer.encode(ref, allowed_special="none")) for _, ref in pairs)
        max_new_tokens = longest + 16
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(pairs), desc="evaluating", unit="example", dynamic_ncols=True)
    predictions = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        completions = llm.complete([messages for messages, _ in chunk], max_new_tokens=max_new_tokens,
                                   temperature=0.0)
        predictions += [c.text for c in completions]
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    references = [ref for _, ref in pairs]
    rows = [{"prompt": messages, "reference": ref, "prediction": pred}
            for (messages, ref), pred in zip(pairs, predictions)]
    return TaskResult(len(pairs), score_all(predictions, references), rows)
