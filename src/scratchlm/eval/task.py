"""Task evaluation: generate an answer for every example of a JSONL file and score it against the reference.

The file has the fine-tuning layout (``{"messages": [...]}`` or ``{"prompt", "completion"}``): the
messages before the last assistant turn are the prompt, that turn's content is the reference. Answers
are greedy (temperature 0), so a score is reproducible; examples are generated in batches.

    result = evaluate_task(LLM.load("smollm2-135m-instruct", adapter="runs/task/best"), "task/test.jsonl")
    result.scores   # {"exact_match": ..., "token_f1": ..., "bleu": ..., "rouge_l": ...}

A *label task* (the references are a few labels, each the answer of several examples, or ``labels`` are
given) is also scored as classification: accuracy, per-class precision/recall/F1, macro/micro/weighted
averages and a confusion matrix (``eval.classification``) in ``result.classification``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from scratchlm.errors import DataError
from scratchlm.eval.classification import ClassificationReport, classification_report, detect_labels, match_label
from scratchlm.eval.metrics import score_all


@dataclass
class TaskResult:
    """Scores over ``n`` examples, and each example's prompt, reference and prediction; ``classification``
    for a label task."""

    n: int
    scores: dict[str, float]
    rows: list[dict] = field(default_factory=list)
    classification: ClassificationReport | None = None

    def summary(self) -> str:
        s = self.scores
        text = (f"exact match {s['exact_match']:.4f}  token F1 {s['token_f1']:.4f}  BLEU {s['bleu']:.2f}  "
                f"ROUGE-L {s['rouge_l']:.4f}  ({self.n} examples)")
        c = self.classification
        if c is not None:
            text += (f"\nlabel task ({len(c.labels)} labels): accuracy {c.accuracy:.4f}  "
                     f"macro F1 {c.averages['macro'][2]:.4f}  micro F1 {c.averages['micro'][2]:.4f}")
        return text


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
                  limit: int | None = None, progress: bool = False,
                  labels: Sequence[str] | None = None) -> TaskResult:
    """Greedy answers to every prompt of ``path``, scored by exact match, token F1, BLEU and ROUGE-L.

    ``max_new_tokens`` defaults to the longest reference in tokens plus 16 (enough to see an answer
    that runs on, without paying for long rambles). ``labels`` makes it a label task with those labels
    (every reference must be one); without them the labels are detected (``detect_labels``).
    ``progress`` shows a bar on stderr with the rate and the time left.
    """
    pairs = read_task(Path(path), limit)
    references = [ref for _, ref in pairs]
    if labels is not None:
        labels = list(dict.fromkeys(labels))
        stray = sorted({r.strip() for r in references} - set(labels))
        if stray:
            raise DataError(f"{path}: references {stray[:5]} are not among the labels {labels}; "
                            "add them to --labels or leave --labels out to detect the labels")
    else:
        labels = detect_labels(references)
    if max_new_tokens is None:
        longest = max(len(llm.tokenizer.encode(ref, allowed_special="none")) for _, ref in pairs)
        max_new_tokens = longest + 16
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(pairs), desc="evaluating", unit="example", dynamic_ncols=True, file=sys.stderr)
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
    rows = [{"prompt": messages, "reference": ref, "prediction": pred}
            for (messages, ref), pred in zip(pairs, predictions)]
    report = None
    if labels:
        answers = [match_label(p, labels) for p in predictions]
        for row, answer in zip(rows, answers):
            row["label"] = answer
        report = classification_report(answers, [r.strip() for r in references], labels)
    return TaskResult(len(pairs), score_all(predictions, references), rows, report)
