"""Distillation: the loss against SciPy's KL divergence, the top-k teacher, and ``scratchlm distill`` end to end
(training, resume, cache reuse, one-line errors for students that cannot learn from the teacher)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_llm
from scratchlm.cli import main
from scratchlm.compress.distill import distillation_loss, kd_loss, topk_kd_loss
from scratchlm.formats.checkpoint import save_model_dir
from scratchlm.llm import LLM

pytestmark = pytest.mark.usefixtures("one_thread")
scipy_stats = pytest.importorskip("scipy.stats")


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.5])
def test_kd_loss_equals_a_direct_kl_computation(temperature):
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 11) * 3, torch.randn(2, 5, 11) * 3
    targets = torch.randint(0, 11, (2, 5))
    targets[1, 3:] = -100  # ignored positions do not count
    loss = kd_loss(student, teacher, targets, temperature)

    p = torch.softmax(teacher.double() / temperature, -1).numpy()
    q = torch.softmax(student.double() / temperature, -1).numpy()
    keep = (targets != -100).numpy()
    expected = np.mean([scipy_stats.entropy(p[b, t], q[b, t]) for b, t in zip(*np.nonzero(keep))])
    assert loss.item() == pytest.approx(temperature**2 * expected, rel=1e-5)


def test_mixed_loss_and_top_k():
    torch.manual_seed(1)
    student, teacher = torch.randn(3, 4, 9), torch.randn(3, 4, 9)
    targets = torch.randint(0, 9, (3, 4))
    t, alpha = 2.0, 0.3
    mixed = distillation_loss(student, targets, teacher_logits=teacher, temperature=t, alpha=alpha)
    ce = F.cross_entropy(student.flatten(0, 1), targets.flatten())
    kl = F.kl_div(F.log_softmax(student / t, -1).flatten(0, 1), F.log_softmax(teacher / t, -1).flatten(0, 1),
                  log_target=True, reduction="batchmean")
    torch.testing.assert_close(mixed, alpha * t * t * kl + (1 - alpha) * ce)
    # With k = the whole vocabulary the top-k loss is the full one; with k < V it renormalises the teacher.
    values, ids = teacher.topk(9, dim=-1)
    torch.testing.assert_close(topk_kd_loss(student, values, ids, targets, t), kd_loss(student, teacher, targets, t))
    values, ids = teacher.topk(3, dim=-1)
    p = torch.softmax(values / t, -1)
    log_q = F.log_softmax(student / t, -1).gather(-1, ids)
    expected = t * t * (p * (p.log() - log_q)).sum(-1).mean()
    torch.testing.assert_close(topk_kd_loss(student, values, ids, targets, t), expected)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    teacher = tiny_llm(seed=0, context_length=64)
    save_model_dir(root / "teacher", teacher.config, teacher.model.canonical_state_dict(), teacher.tokenizer)
    with open("src/scratchlm/data/shakespeare.txt", encoding="utf-8") as f:
        (root / "text.txt").write_text(f.read(20_000), encoding="utf-8")
    return root


def distill(files, out, *extra):
    return main(["distill", "--teacher", str(files / "teacher"), "--data", str(files / "text.txt"), "--out",
                 str(out), "--context-length", "32", "--batch-size", "4", "--eval-interval", "6", *extra])


def test_distill_trains_the_student_towards_the_teacher_and_resumes(files, tmp_path):
    # A new one-layer student of the teacher's architecture learns the teacher's distribution.
    config = dict(tiny_llm().config.to_dict(), n_layers=1, context_length=64)
    del config["vocab_size"]
    (tmp_path / "student.json").write_text(json.dumps(config))
    out = tmp_path / "run"
    assert distill(files, out, "--student", str(tmp_path / "student.json"), "--max-steps", "6", "--lr", "3e-3",
                   "--alpha", "1", "--temperature", "1") == 0
    record = json.loads((out / "run.json").read_text())
    assert record["command"] == "distill" and record["options"]["alpha"] == 1
    teacher = LLM.load(files / "teacher").model
    student = LLM.load(out / "last").model
    assert student.config.n_layers == 1
    x = torch.randint(0, 256, (4, 32))
    torch.manual_seed(0)
    fresh = type(student)(student.config)
    with torch.no_grad():
        target = teacher(x)
        before = kd_loss(fresh(x), target, x).item()
        after = kd_loss(student(x), target, x).item()
    assert after < before
    assert (out / "loss.png").is_file() and (out / "best" / "model.safetensors").is_file()

    assert distill(files, out, "--resume", "--max-steps", "12") == 0  # only --out and what may change
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == list(range(1, 13))


def test_top_k_teacher_cache_is_reused_by_a_second_student(files, tmp_path, capsys):
    student = tmp_path / "student"
    small = tiny_llm(seed=4, context_length=64, n_layers=1)
    save_model_dir(student, small.config, small.model.canonical_state_dict(), small.tokenizer)
    cache = tmp_path / "cache"
    for run in ("a", "b"):
        assert distill(files, tmp_path / run, "--student", str(student), "--max-steps", "3", "--top-k", "16",
                       "--teacher-cache", str(cache)) == 0
    out = capsys.readouterr().out
    assert "0 batches read, 3 computed" in out and "3 batches read, 0 computed" in out
    assert len(list(cache.glob("*.safetensors"))) == 3


def test_students_that_cannot_learn_from_the_teacher_get_one_line_errors(files, tmp_path, capsys):
    other = tiny_llm(seed=0, vocab_size=300)  # another vocabulary
    save_model_dir(tmp_path / "other", other.config, other.model.canonical_state_dict(), other.tokenizer)
    config = dict(tiny_llm().config.to_dict(), vocab_size=1000)
    (tmp_path / "wide.json").write_text(json.dumps(config))
    cases = [
        (["--student", str(tmp_path / "other")], "vocabulary of 300 tokens"),
        (["--student", str(tmp_path / "wide.json")], "vocabularies must be the same"),
        (["--student", "tiny-llama", "--alpha", "1.5"], "--alpha"),
        (["--student", "tiny-llama", "--temperature", "0"], "--temperature must be positive"),
        (["--student", "tiny-llama", "--teacher-cache", str(tmp_path / "c")], "give --top-k"),
        (["--student", "tiny-llama", "--context-length", "500"], "exceeds"),
    ]
    for args, message in cases:
        code = main(["distill", "--teacher", str(files / "teacher"), "--data", str(files / "text.txt"),
                     "--out", str(tmp_path / "out"), *args])
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1, (args, err)
