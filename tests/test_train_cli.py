"""`scratchlm train` end to end: output files, two processes under torchrun, bad input (resume: test_resume.py).

Every run is a tiny model (2 layers, 32 dimensions, context 16) on 30k characters of the bundled corpus.
Subprocesses use one thread each, so runs are deterministic and comparable.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from scratchlm.cli import main
from scratchlm.train.sources import bundled_corpus

TEXT = bundled_corpus().read_text(encoding="utf-8")[:30_000]
TINY = ["--context-length", "16", "--n-layers", "2", "--n-heads", "2", "--d-model", "32", "--batch-size", "4",
        "--eval-batches", "2", "--warmup-steps", "2", "--lr", "3e-3", "--min-lr", "3e-4"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "plays.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def step_losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def val_losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["val_loss"] for r in records if "val_loss" in r}


def scratchlm(*args: str) -> subprocess.CompletedProcess:
    """Run the CLI in a fresh process with one thread."""
    proc = subprocess.run([sys.executable, "-m", "scratchlm.cli", "--threads", "1", *args], env=ENV,
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


# ---- what a person sees ------------------------------------------------------------------------------
def test_train_writes_checkpoints_metrics_plot_and_prints_progress_and_samples(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", str(data), "--out", str(out), "--max-steps", "8", "--eval-interval", "4",
                 "--sample-tokens", "30", "--prompt", "Ham.", *TINY]) == 0
    captured = capsys.readouterr()
    assert "step 4: val loss" in captured.out and "step 8: val loss" in captured.out
    assert captured.out.count("  | ") >= 2  # a sample at each evaluation
    assert "8/8" in captured.err and "tok/s=" in captured.err and "loss=" in captured.err  # the progress bar
    assert sorted(step_losses(out)) == list(range(1, 9)) and sorted(val_losses(out)) == [4, 8]
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "best" / "model.safetensors").is_file() and (out / "last" / "optimizer.safetensors").is_file()
    assert (out / "data" / "train.bin").is_file()

    # A second run into the same directory must not silently replace the first.
    assert main(["train", str(data), "--out", str(out), "--max-steps", "8", *TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "already holds a training run" in err and "--resume" in err

    # Resuming into another model shape says what differs.
    assert main(["train", str(data), "--out", str(out), "--resume", *TINY, "--n-layers", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "n_layers: 2 -> 3" in err and len(err.splitlines()) == 1

    # --resume goes on from step 8; the schedule follows the new --max-steps.
    assert main(["train", str(data), "--out", str(out), "--resume", "--max-steps", "12", "--eval-interval", "4",
                 "--no-progress", "--sample-tokens", "0", *TINY]) == 0
    assert sorted(step_losses(out)) == list(range(1, 13)) and sorted(val_losses(out)) == [4, 8, 12]


def test_bpe_preset_trains_its_tokenizer_with_the_bpe_trainer(data, tmp_path, capsys):
    pytest.importorskip("scratchlm.train.bpe")
    out = tmp_path / "bpe"
    assert main(["train", str(data), "--preset", "shakespeare-bpe", "--vocab-size", "300", "--out", str(out),
                 "--max-steps", "4", "--eval-interval", "4", "--no-progress", "--sample-tokens", "5", *TINY]) == 0
    from scratchlm.llm import LLM

    llm = LLM.load(out / "last")
    assert llm.config.vocab_size == 300 and len(llm.tokenizer.merges) > 0
    assert llm.tokenizer.eos_token == "<|endoftext|>"


@pytest.mark.parametrize("args, message", [
    (["--preset", "shakespeare-bpe", "--vocab-size", "100"], "at least 257"),
    (["--vocab-size", "500"], "applies to BPE presets"),
    (["--preset", "nope"], "unknown training preset"),
])
def test_bad_options_are_one_line_errors(data, tmp_path, capsys, args, message):
    assert main(["train", str(data), "--out", str(tmp_path / "x"), "--no-progress", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"),
    (b"To be, or not to be.", "too short"),
    (b"ok\n\xff\xfe", "invalid UTF-8 at byte offset 3"),
])
def test_bad_corpora_are_one_line_errors(tmp_path, capsys, content, message):
    (tmp_path / "corpus.txt").write_bytes(content)
    assert main(["train", str(tmp_path / "corpus.txt"), "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


# ---- exact resume after SIGKILL: tests/test_resume.py (the README's sequence, on the user's data) -----------


# ---- two processes -----------------------------------------------------------------------------------
def test_two_processes_under_torchrun_follow_the_single_process_loss_curve(data, tmp_path):
    common = [str(data), "--max-steps", "20", "--eval-interval", "10", "--batch-size", "8", "--no-progress",
              "--sample-tokens", "0", *TINY[:8], *TINY[10:]]
    scratchlm("train", "--out", str(tmp_path / "one"), *common)
    scratchlm("train", "--out", str(tmp_path / "other-seed"), "--seed", "7", *common)
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "scratchlm.cli", "train", "--out", str(tmp_path / "two"), *common],
        env=ENV, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stdout + ddp.stderr
    assert ddp.stdout.count("step 10: val loss") == 1  # only rank 0 prints
    one, two, other = (step_losses(tmp_path / name) for name in ("one", "two", "other-seed"))
    assert sorted(two) == list(range(1, 21))
    # Each process averages its 4 rows and DDP averages the two means: the same gradient as one process over
    # 8 rows, summed in another order. Only float32 rounding differs (~1e-7 relative per sum); Adam divides by
    # sqrt(v), which can amplify it, but over 20 steps the curves stay within a few float32 ulps (measured:
    # at most 3.6e-7 here). 1e-4 leaves 300x headroom for other CPUs and thread counts, and is still 500x
    # smaller than what a different data seed does to the same curve (up to 0.13 here).
    worst = max(abs(one[s] - two[s]) for s in one)
    assert worst < 1e-4, worst
    assert max(abs(one[s] - other[s]) for s in one) > 0.05
    for step, loss in val_losses(tmp_path / "one").items():
        assert abs(val_losses(tmp_path / "two")[step] - loss) < 1e-4


# ---- the documentation's Python snippets run as written ----------------------------------------------
def python_blocks(markdown: str) -> list[str]:
    blocks, inside = [], None
    for line in markdown.splitlines():
        if inside is None and line.startswith("```python"):
            inside = []
        elif inside is not None and line.startswith("```"):
            blocks.append("\n".join(inside))
            inside = None
        elif inside is not None:
            inside.append(line)
    return blocks


def test_the_python_snippets_in_docs_training_md_run(tmp_path, monkeypatch, capsys):
    from conftest import tiny_llm
    from scratchlm.formats.checkpoint import save_model_dir

    root = Path(__file__).resolve().parents[1]
    pipeline, loop, bpe, unigram, finetune = python_blocks((root / "docs" / "training.md").read_text(encoding="utf-8"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "examples").symlink_to(root / "examples")

    scope: dict = {}
    exec(pipeline, scope)
    assert scope["result"].step == 30 and capsys.readouterr().out.count("TrainResult(step=20,") == 1
    exec(loop, scope := {})
    assert scope["result"].step == 20 and repr(scope["result"]) in capsys.readouterr().out
    exec(bpe, scope := {})
    assert "To be, or not to be" in capsys.readouterr().out and (tmp_path / "tokenizer.json").is_file()
    # The Unigram snippet loads runs/uni/tokenizer.json, which the page's CLI block trains: train a small one.
    from scratchlm.unigram_train import train_unigram

    text = (root / "src" / "scratchlm" / "data" / "shakespeare.txt").read_text(encoding="utf-8")[:60_000]
    (tmp_path / "runs" / "uni").mkdir(parents=True)
    train_unigram(text.splitlines(), vocab_size=300).save(tmp_path / "runs" / "uni" / "tokenizer.json")
    exec(unigram, scope := {})
    printed = capsys.readouterr().out.splitlines()
    assert "▁" in printed[0] and printed[1] == "To be, or not to be"
    # The fine-tuning snippet as written, on a tiny model instead of SmolLM2 and with fewer steps.
    llm = tiny_llm("llama", seed=0, context_length=1024)  # the task's examples are ~300 bytes
    save_model_dir(tmp_path / "tiny", llm.config, llm.model.canonical_state_dict(), llm.tokenizer)
    small = (finetune.replace('"smollm2-135m-instruct"', repr(str(tmp_path / "tiny")))
             .replace("max_steps=60", "max_steps=2").replace("eval_interval=30", "eval_interval=2")
             .replace("max_steps=80", "max_steps=3"))
    assert "smollm2" not in small and "max_steps=2" in small and "max_steps=3" in small
    exec(small, scope := {})
    assert scope["result"].step == 3
