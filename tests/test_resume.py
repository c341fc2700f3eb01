"""`scratchlm train --out DIR --resume` restores the run: its data, tokenizer, options and length (issue 21).

The README's sequence is `scratchlm train my_texts/ --out runs/mine --max-steps 5000 --context-length 128`,
killed, then `scratchlm train --out runs/mine --resume` with no other flag. Here: a tiny model on a folder of
text that is not Shakespeare (Python source: braces and underscores that the plays never use), so a resume
that fell back to the bundled corpus could not go unnoticed.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from scratchlm.cli import main
from scratchlm.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--n-layers", "2", "--n-heads", "2", "--d-model", "32", "--batch-size", "4", "--eval-batches", "2",
        "--warmup-steps", "2", "--lr", "3e-3", "--min-lr", "3e-4", "--dropout", "0.1"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture
def my_texts(tmp_path) -> Path:
    folder = tmp_path / "my_texts"
    folder.mkdir()
    (folder / "textwrap.txt").write_text(inspect.getsource(textwrap)[:20_000], encoding="utf-8")
    (folder / "json.md").write_text(inspect.getsource(json)[:10_000], encoding="utf-8")
    return folder


def scratchlm(*args: str, kill_at_batch: int = -1, check: bool = True) -> subprocess.CompletedProcess:
    """The CLI in a fresh process; with ``kill_at_batch`` it SIGKILLs itself when it draws that training batch
    (deterministic, unlike a kill from outside that races with a run this small)."""
    code = (
        "import os, signal, sys\n"
        "import scratchlm.train.data as data\n"
        "draw = data.RandomBatches.__next__\n"
        "def next_batch(self):\n"
        f"    if self.index == {kill_at_batch}:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return draw(self)\n"
        "data.RandomBatches.__next__ = next_batch\n"
        "from scratchlm.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, "--threads", "1", *args], env=ENV, capture_output=True,
                          text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def metrics(out: Path, key: str) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in records if key in r}


def snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    """Bytes and modification time of every file in a directory."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(directory.iterdir()) if p.is_file()}


def test_the_readme_sequence_resumes_on_the_users_data_after_sigkill_and_matches_a_straight_run(my_texts, tmp_path):
    first = [str(my_texts), "--max-steps", "12", "--context-length", "32", "--eval-interval", "4", "--grad-accum",
             "2", "--sample-tokens", "0", "--no-progress", *TINY]
    scratchlm("train", *first, "--out", str(tmp_path / "straight"))
    mine = tmp_path / "mine"
    # Step s draws micro-batches 2(s-1) and 2(s-1)+1: batch 19 is the second half of step 10, so the process
    # dies with step 10's first backward done, two steps after the checkpoint of step 8.
    killed = scratchlm("train", *first, "--out", str(mine), kill_at_batch=19, check=False)
    assert killed.returncode == -9
    data_before = snapshot(mine / "data")
    assert {"train.bin", "val.bin", "data.json", "tokenizer.json"} <= set(data_before)

    resumed = scratchlm("train", "--out", str(mine), "--resume")  # no other flag, as in the README

    assert "resuming" in resumed.stdout and "at step 8 of 12" in resumed.stdout
    assert snapshot(mine / "data") == data_before  # the token files were not rewritten, not even touched
    meta = json.loads((mine / "data" / "data.json").read_text())
    assert sorted(Path(row["path"]).name for row in meta["sources"]) == ["json.md", "textwrap.txt"]
    tokenizer = Tokenizer.from_file(mine / "last" / "tokenizer.json")
    assert tokenizer.token_to_id("{") is not None and tokenizer.token_to_id("_") is not None  # the user's text
    config = json.loads((mine / "last" / "model_config.json").read_text())
    assert config["context_length"] == 32 and config["vocab_size"] == tokenizer.vocab_size
    # The recorded max_steps (12, not the preset's 2,000), and the uninterrupted run's losses bit for bit.
    straight, again = metrics(tmp_path / "straight", "loss"), metrics(mine, "loss")
    assert sorted(again) == list(range(1, 13))
    assert again == straight
    assert metrics(mine, "val_loss") == metrics(tmp_path / "straight", "val_loss")
    assert "Shakespeare" not in resumed.stdout and "sample" not in resumed.stdout.lower()  # sample_tokens 0 kept


def test_resume_refuses_a_changed_option_with_the_differences_and_allows_a_longer_run(my_texts, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", str(my_texts), "--out", str(out), "--max-steps", "4", "--eval-interval", "4",
                 "--context-length", "32", "--sample-tokens", "0", "--no-progress", *TINY]) == 0
    recorded = json.loads((out / "run.json").read_text())["options"]
    assert recorded["context_length"] == 32 and recorded["max_steps"] == 4 and recorded["lr"] == 3e-3
    assert recorded["data"] == str(my_texts.resolve()) and recorded["preset"] == "shakespeare-char"
    capsys.readouterr()

    assert main(["train", "--out", str(out), "--resume", "--context-length", "16", "--lr", "1e-3"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "context_length: 32 -> 16" in err and "lr: 0.003 -> 0.001" in err and "max_steps" in err  # may change
    assert main(["train", str(tmp_path), "--out", str(out), "--resume"]) == 2  # other data
    assert f"data: {str(my_texts.resolve())!r} -> {str(tmp_path.resolve())!r}" in capsys.readouterr().err
    # The same values again are no change; --max-steps extends the run, and run.json remembers it.
    data_before = snapshot(out / "data")
    assert main(["train", "--out", str(out), "--resume", "--max-steps", "8", "--context-length", "32",
                 "--no-progress"]) == 0
    assert "changed: max_steps 4 -> 8" in capsys.readouterr().out
    assert sorted(metrics(out, "loss")) == list(range(1, 9))
    assert json.loads((out / "run.json").read_text())["options"]["max_steps"] == 8
    assert snapshot(out / "data") == data_before


def test_resume_after_the_text_changed_warns_and_goes_on_with_the_runs_token_files(my_texts, tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--eval-interval", "4", "--context-length", "32", "--sample-tokens", "0", "--no-progress", *TINY]
    assert main(["train", str(my_texts), "--out", str(out), "--max-steps", "4", *common]) == 0
    data_before = snapshot(out / "data")
    (my_texts / "json.md").write_text("edited since", encoding="utf-8")
    (my_texts / "textwrap.txt").unlink()
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", "--max-steps", "8"]) == 0
    printed = capsys.readouterr().out
    assert "warning: the training text changed since this run started" in printed
    assert "json.md (edited)" in printed and "textwrap.txt (missing)" in printed
    assert snapshot(out / "data") == data_before and sorted(metrics(out, "loss")) == list(range(1, 9))


def test_resume_refuses_token_files_that_changed_and_a_directory_without_a_checkpoint(my_texts, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", str(my_texts), "--out", str(out), "--max-steps", "4", "--eval-interval", "4",
                 "--context-length", "32", "--sample-tokens", "0", "--no-progress", *TINY]) == 0
    train_bin = out / "data" / "train.bin"
    train_bin.write_bytes(train_bin.read_bytes()[:-2])
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", "--max-steps", "8"]) == 2
    err = capsys.readouterr().err
    assert "train.bin is missing or changed since the run started" in err and "--force" in err
    assert main(["train", "--out", str(tmp_path / "empty"), "--resume"]) == 2
    assert "no checkpoint to resume from" in capsys.readouterr().err


def test_an_existing_run_is_replaced_only_with_force_and_the_message_says_every_way_out(my_texts, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", str(my_texts), "--out", str(out), "--max-steps", "2", "--eval-interval", "2",
            "--context-length", "32", "--sample-tokens", "0", "--no-progress", *TINY]
    assert main(args) == 0
    capsys.readouterr()
    assert main([*args, "--lr", "1e-3"]) == 2
    err = capsys.readouterr().err
    assert f"scratchlm train --out {out} --resume" in err and "--force" in err and "--out ANOTHER_DIR" in err
    assert main([*args, "--lr", "1e-3", "--force"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert json.loads((out / "run.json").read_text())["options"]["lr"] == 1e-3


def test_a_run_from_before_run_json_resumes_with_its_checkpoints_options_and_token_files(my_texts, tmp_path, capsys):
    out = tmp_path / "old"
    assert main(["train", str(my_texts), "--out", str(out), "--max-steps", "4", "--eval-interval", "4",
                 "--context-length", "32", "--sample-tokens", "0", "--no-progress", *TINY]) == 0
    (out / "run.json").unlink()
    data_before = snapshot(out / "data")
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", "--max-steps", "6", "--sample-tokens", "0",
                 "--no-progress"]) == 0
    assert f"{out} has no run.json (an older run)" in capsys.readouterr().out
    assert sorted(metrics(out, "loss")) == list(range(1, 7)) and snapshot(out / "data") == data_before
    options = json.loads((out / "run.json").read_text())["options"]
    assert options["context_length"] == 32 and options["lr"] == 3e-3 and options["max_steps"] == 6
    assert options["data"] == str(my_texts.resolve())  # from the token files' sources, not the default corpus
