"""Classification metrics for label tasks: accuracy, per-class precision/recall/F1, averages, confusion matrix.

A *label task* is one whose answers come from a small, fixed set of labels ("positive"/"negative", a topic,
a yes/no). Its references are the labels; a generated answer is mapped onto a label by ``match_label``, and
an answer that is none of them counts as the extra column ``OTHER`` (always wrong).

The definitions are scikit-learn's (``accuracy_score``, ``precision_recall_fscore_support`` with
``labels=labels, zero_division=0``, ``confusion_matrix``), and tests/test_eval_classification.py checks
equality with scikit-learn:

* per class c: precision = TP / (TP + FP), recall = TP / (TP + FN), F1 = 2PR / (P + R); a ratio whose
  denominator is 0 (a class never predicted, or never in the references) is 0, as ``zero_division=0``;
* **macro**: the unweighted mean over the labels, so a rare class counts as much as a common one;
* **weighted**: the mean weighted by each label's support (its number of references);
* **micro**: precision and recall from the summed TP/FP/FN over the labels. Answers outside the labels
  (``OTHER``) are false negatives of their reference's class but false positives of no class, as in
  scikit-learn with ``labels=``; so micro precision can exceed accuracy when the model answers off-label.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass

OTHER = "(other)"  # the column of answers that are none of the labels
_STRIP = string.whitespace + string.punctuation + "\u201c\u201d\u2018\u2019"


def detect_labels(references: Sequence[str], max_labels: int = 20) -> list[str] | None:
    """The label set when the references look like labels, else None.

    References look like labels when there are at most ``max_labels`` distinct ones, each a single line,
    and on average every label is the answer at least twice (so that a task of unique answers, such as
    extraction, is never taken for classification).
    """
    distinct = sorted({r.strip() for r in references})
    if not distinct or len(distinct) > max_labels or any("\n" in r for r in distinct):
        return None
    if len(references) < 2 * len(distinct):
        return None
    return distinct


def match_label(prediction: str, labels: Sequence[str]) -> str:
    """The label a generated answer names, or ``OTHER``.

    In this order: the whole answer without surrounding whitespace; its first line compared without case and
    without surrounding punctuation or quotes (``"Positive."`` is ``positive``); the label the answer starts
    with, followed by a non-word character (``No. Carrots are vegetables.`` is ``no``; ``positively`` is no
    label), the longest such label when several match.
    """
    text = prediction.strip()
    if text in labels:
        return text
    first = text.split("\n", 1)[0].strip(_STRIP).casefold()
    keys = {label: label.strip(_STRIP).casefold() for label in labels}
    for label, key in keys.items():
        if key == first:
            return label
    starts = [label for label, key in keys.items()
              if key and first.startswith(key) and not (first[len(key):len(key) + 1].isalnum()
                                                        or first[len(key):len(key) + 1] == "_")]
    return max(starts, key=lambda label: len(keys[label])) if starts else OTHER


@dataclass
class ClassificationReport:
    """Metrics of one label task. ``per_class[label] = (precision, recall, f1, support)``;
    ``confusion[i][j]`` counts references ``labels[i]`` answered as ``columns[j]`` (``columns`` are the
    labels, plus ``OTHER`` when some answer named none)."""

    labels: list[str]
    columns: list[str]
    accuracy: float
    per_class: dict[str, tuple[float, float, float, int]]
    averages: dict[str, tuple[float, float, float]]  # "macro" | "micro" | "weighted" -> (precision, recall, f1)
    confusion: list[list[int]]

    def as_dict(self) -> dict:
        """A JSON-ready dict."""
        return {"labels": self.labels, "accuracy": self.accuracy,
                "per_class": {k: dict(zip(("precision", "recall", "f1", "support"), v))
                              for k, v in self.per_class.items()},
                **{f"{name}_avg": dict(zip(("precision", "recall", "f1"), v)) for name, v in self.averages.items()},
                "confusion_matrix": {"rows": self.labels, "columns": self.columns, "counts": self.confusion}}

    def table(self) -> str:
        """The report as text: one row per class, the averages, then the confusion matrix."""
        width = max(12, *(len(c) for c in self.columns))
        lines = [f"{'':<{width}}  precision  recall      f1  support"]
        for label, (p, r, f, n) in self.per_class.items():
            lines.append(f"{label:<{width}}  {p:9.4f}  {r:6.4f}  {f:6.4f}  {n:7d}")
        total = sum(n for *_, n in self.per_class.values())
        for name, (p, r, f) in self.averages.items():
            lines.append(f"{name + ' avg':<{width}}  {p:9.4f}  {r:6.4f}  {f:6.4f}  {total:7d}")
        lines.append(f"{'accuracy':<{width}}  {self.accuracy:.4f}")
        lines.append("")
        lines.append("confusion matrix (rows: reference, columns: answer)")
        lines.append(" " * width + "  " + "  ".join(f"{c:>{width}}" for c in self.columns))
        for label, row in zip(self.labels, self.confusion):
            lines.append(f"{label:<{width}}  " + "  ".join(f"{n:>{width}d}" for n in row))
        return "\n".join(lines)


def _ratio(a: float, b: float) -> float:
    return a / b if b else 0.0  # scikit-learn's zero_division=0


def _f1(p: float, r: float) -> float:
    return _ratio(2 * p * r, p + r)


def classification_report(predictions: Sequence[str], references: Sequence[str],
                          labels: Sequence[str]) -> ClassificationReport:
    """Metrics of ``predictions`` (already mapped with ``match_label``) against ``references`` over ``labels``."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    labels = list(labels)
    columns = labels + ([OTHER] if any(p not in labels for p in predictions) else [])
    index = {c: i for i, c in enumerate(columns)}
    confusion = [[0] * len(columns) for _ in labels]
    for pred, ref in zip(predictions, references):
        if ref in index and ref != OTHER:
            confusion[index[ref]][index[pred if pred in index else OTHER]] += 1
    n = len(references)
    correct = sum(p == r for p, r in zip(predictions, references))
    per_class, tp_sum, pred_sum, true_sum = {}, 0, 0, 0
    for i, label in enumerate(labels):
        tp = confusion[i][i]
        predicted = sum(p == label for p in predictions)
        support = sum(r == label for r in references)
        p, r = _ratio(tp, predicted), _ratio(tp, support)
        per_class[label] = (p, r, _f1(p, r), support)
        tp_sum, pred_sum, true_sum = tp_sum + tp, pred_sum + predicted, true_sum + support
    k = max(len(labels), 1)
    macro = tuple(sum(v[j] for v in per_class.values()) / k for j in range(3))
    weighted = tuple(_ratio(sum(v[j] * v[3] for v in per_class.values()), true_sum) for j in range(3))
    micro_p, micro_r = _ratio(tp_sum, pred_sum), _ratio(tp_sum, true_sum)
    return ClassificationReport(
        labels=labels, columns=columns, accuracy=_ratio(correct, n), per_class=per_class,
        averages={"macro": macro, "micro": (micro_p, micro_r, _f1(micro_p, micro_r)), "weighted": weighted},
        confusion=confusion,
    )


def confusion_matrix_png(report: ClassificationReport, title: str = "") -> bytes:
    """The confusion matrix drawn as a PNG (counts in the cells, rows normalised for the colour)."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg: no display needed
    from matplotlib.figure import Figure

    rows, cols = len(report.labels), len(report.columns)
    size = max(3.5, 0.6 * max(rows, cols) + 2)
    fig = Figure(figsize=(size + 1, size), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    shares = [[n / max(sum(row), 1) for n in row] for row in report.confusion]
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for i, row in enumerate(report.confusion):
        for j, n in enumerate(row):
            ax.text(j, i, str(n), ha="center", va="center", color="white" if shares[i][j] > 0.5 else "black")
    ax.set_xticks(range(cols), report.columns, rotation=45, ha="right")
    ax.set_yticks(range(rows), report.labels)
    ax.set_xlabel("answer")
    ax.set_ylabel("reference")
    ax.set_title(title or f"accuracy {report.accuracy:.3f}, macro F1 {report.averages['macro'][2]:.3f}")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the reference's examples")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()
