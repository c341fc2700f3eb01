"""Classification metrics of label tasks equal scikit-learn's; `scratchlm eval task` prints them, draws the confusion
matrix and shows a progress bar only to a terminal."""

from __future__ import annotations

import json
import random
import sys

import pytest

from conftest import tiny_llm
from scratchlm.cli import main
from scratchlm.eval.classification import OTHER, classification_report, detect_labels, match_label
from scratchlm.eval.task import evaluate_task

metrics = pytest.importorskip("sklearn.metrics")
pytestmark = pytest.mark.usefixtures("one_thread")


def assert_equals_sklearn(report, y_true, y_pred, labels):
    """Every number of ``report`` against scikit-learn with ``labels=labels, zero_division=0``."""
    assert report.accuracy == pytest.approx(metrics.accuracy_score(y_true, y_pred), abs=1e-12)
    p, r, f, s = metrics.precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    for i, label in enumerate(labels):
        assert report.per_class[label] == pytest.approx((p[i], r[i], f[i], s[i]), abs=1e-12)
    for average in ("macro", "micro", "weighted"):
        expected = metrics.precision_recall_fscore_support(y_true, y_pred, labels=labels, average=average,
                                                           zero_division=0)[:3]
        assert report.averages[average] == pytest.approx(expected, abs=1e-12), average
    confusion = metrics.confusion_matrix(y_true, y_pred, labels=report.columns)
    assert report.confusion == confusion[:len(labels)].tolist()
    assert not confusion[len(labels):].any()  # no reference is OTHER


@pytest.mark.parametrize("seed", range(40))
def test_metrics_equal_scikit_learn_on_random_tasks(seed):
    rng = random.Random(seed)
    labels = [f"class{i}" for i in range(rng.randint(1, 6))]
    n = rng.randint(1, 40)
    y_true = [rng.choice(labels[: max(1, len(labels) - 1)]) for _ in range(n)]  # the last label may lack support
    # Answers: mostly labels, some off-label (OTHER), and some labels never answered.
    y_pred = [rng.choice(labels[:2] + [OTHER]) if rng.random() < 0.5 else t for t in y_true]
    report = classification_report(y_pred, y_true, labels)
    assert_equals_sklearn(report, y_true, y_pred, labels)


def test_zero_division_cases_are_zero_as_in_scikit_learn():
    labels = ["cat", "dog", "fox"]
    y_true = ["cat", "cat", "dog", "dog"]  # fox: never a reference (recall 0/0)
    y_pred = ["cat", OTHER, OTHER, "cat"]  # dog: never answered (precision 0/0)
    report = classification_report(y_pred, y_true, labels)
    assert report.per_class["dog"] == (0.0, 0.0, 0.0, 2) and report.per_class["fox"] == (0.0, 0.0, 0.0, 0)
    assert report.columns == ["cat", "dog", "fox", OTHER]
    assert_equals_sklearn(report, y_true, y_pred, labels)


def test_answers_are_matched_to_labels():
    labels = ["positive", "negative", "Not sure"]
    assert match_label("  negative\n", labels) == "negative"
    assert match_label("Positive.", labels) == "positive"
    assert match_label('"not sure"\nbecause the review is mixed', labels) == "Not sure"
    assert match_label("Negative, because the plot drags.", labels) == "negative"
    assert match_label("Not sure; it is mixed", [*labels, "Not"]) == "Not sure"  # the longest label that fits
    assert match_label("positively", labels) == OTHER
    assert match_label("the answer is positive", labels) == OTHER
    assert match_label("", labels) == OTHER


def test_label_tasks_are_detected_from_repeated_short_references():
    assert detect_labels(["yes", "no", "yes", "no", " yes"]) == ["no", "yes"]
    bookings = [line for line in open("examples/task/test.jsonl", encoding="utf-8")]
    references = [json.loads(line)["messages"][-1]["content"] for line in bookings]
    assert detect_labels(references) is None  # extraction: every answer is different
    assert detect_labels(["a", "b", "c"]) is None  # no label repeats: nothing says these are labels


# ---- evaluate_task and the CLI with a real (tiny, random) model ---------------------------------------------
def label_task(tmp_path):
    """A label task for the tiny random model: its own greedy answers are the labels, so some examples are
    right, some wrong (references swapped), and one label ("never") is never answered."""
    llm = tiny_llm()
    prompts = [[{"role": "user", "content": f"Is {i} even?"}] for i in range(12)]
    answers = [c.text.strip() for c in llm.complete(prompts, max_new_tokens=3, temperature=0.0)]
    labels = sorted(set(answers))
    assert len(labels) >= 2
    references = [a if i % 3 else labels[(labels.index(a) + 1) % len(labels)] for i, a in enumerate(answers)]
    references[5] = references[7] = "never"
    path = tmp_path / "task.jsonl"
    path.write_text("".join(json.dumps({"messages": [*p, {"role": "assistant", "content": r}]}) + "\n"
                            for p, r in zip(prompts, references)), encoding="utf-8")
    return llm, path, answers, references


def test_evaluate_task_scores_a_label_task_like_scikit_learn(tmp_path):
    llm, path, answers, references = label_task(tmp_path)
    result = evaluate_task(llm, path, max_new_tokens=3)
    report = result.classification
    assert report is not None and "never" in report.labels
    assert [row["label"] for row in result.rows] == answers
    assert_equals_sklearn(report, references, answers, report.labels)
    assert "label task" in result.summary()
    assert 0 < report.accuracy < 1


def test_explicit_labels_must_cover_the_references(tmp_path):
    from scratchlm.errors import DataError

    llm, path, _, _ = label_task(tmp_path)
    with pytest.raises(DataError, match="not among the labels"):
        evaluate_task(llm, path, max_new_tokens=3, labels=["never"])


@pytest.fixture
def tiny_dir(tmp_path):
    from scratchlm.formats.checkpoint import save_model_dir

    llm = tiny_llm()
    save_model_dir(tmp_path / "model", llm.config, llm.model.canonical_state_dict(), llm.tokenizer)
    return tmp_path / "model"


def test_cli_prints_the_report_and_draws_the_confusion_matrix(tmp_path, tiny_dir, capsys):
    _, path, answers, references = label_task(tmp_path)
    png = tmp_path / "plots" / "confusion.png"
    argv = ["eval", "task", str(tiny_dir), str(path), "--max-new-tokens", "3", "--confusion-matrix", str(png),
            "--json", "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "macro avg" in out and "confusion matrix (rows: reference, columns: answer)" in out
    scores = json.loads(out.strip().splitlines()[-1])["classification"]
    assert scores["accuracy"] == pytest.approx(metrics.accuracy_score(references, answers))
    assert scores["macro_avg"]["f1"] == pytest.approx(
        metrics.f1_score(references, answers, labels=scores["labels"], average="macro", zero_division=0))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(argv) == 2  # exists: not replaced without --force
    assert "--force" in capsys.readouterr().err
    assert main([*argv, "--force"]) == 0


def test_cli_confusion_matrix_needs_a_label_task(tiny_dir, capsys):
    argv = ["eval", "task", str(tiny_dir), "examples/task/test.jsonl", "--confusion-matrix", "x.png"]
    assert main(argv) == 2
    assert "--labels" in capsys.readouterr().err


# ---- progress ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tty,flag,shown", [(True, [], True), (True, ["--no-progress"], False), (False, [], False)])
def test_progress_bar_only_for_a_terminal(tmp_path, tiny_dir, capsys, monkeypatch, tty, flag, shown):
    _, path, _, _ = label_task(tmp_path)
    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question. " * 8, encoding="utf-8")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: tty)
    for argv in (["eval", "task", str(tiny_dir), str(path), "--max-new-tokens", "3", "--batch-size", "4"],
                 ["eval", "perplexity", str(tiny_dir), str(text), "--context", "64", "--stride", "32"]):
        assert main(argv + flag) == 0
        err = capsys.readouterr().err
        # tqdm's line: rate (units/s) and elapsed<remaining; and how long the model took to load
        assert (("/s]" in err or "s/" in err) and "<" in err) is shown, err
        assert (f"loading {tiny_dir} ..." in err) is shown
