"""``scratchlm align reward`` and ``align score`` end to end on a tiny model: the reward model learns to rank the
chosen answers first, loads back through ``heads.load_head_model`` (as PPO loads it), and resumes exactly."""

from __future__ import annotations

import json

import pytest
import torch

from scratchlm.align.reward import run_reward, score_file
from scratchlm.align.run import AlignOptions, AlignReport
from scratchlm.cli import main
from scratchlm.heads import load_head_model
from scratchlm.train.report import read_metrics
from test_dpo import ROWS, base_dir, data, quiet  # noqa: F401  (module fixtures shared with the DPO tests)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_reward_cli_learns_the_preference_and_score_prints_rewards(base_dir, data, tmp_path, capsys):  # noqa: F811
    run = tmp_path / "rm"
    assert main(["align", "reward", str(base_dir), "--data", str(data), "--out", str(run), "--rank", "4",
                 "--max-steps", "8", "--batch-size", "4", "--lr", "5e-3", "--eval-interval", "4",
                 "--val-fraction", "0.25", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "held-out preference accuracy" in out and "align score" in out
    evals = [r for r in read_metrics(run / "metrics.jsonl") if "val_loss" in r]
    assert evals[-1]["val_accuracy"] >= 2 / 3 and evals[-1]["val_margin"] > 0
    assert main(["align", "score", str(run / "best"), "--data", str(data)]) == 0
    captured = capsys.readouterr()
    lines = [json.loads(line) for line in captured.out.splitlines()]
    assert [r["line"] for r in lines] == list(range(1, len(ROWS) + 1))
    right = sum(r["chosen"] > r["rejected"] for r in lines)
    assert right >= 9 and f"({right} of {len(ROWS)} pairs)" in captured.err
    # a conversation file gets one reward per line, equal to the pair's reward for the same text
    conversations = tmp_path / "c.jsonl"
    conversations.write_text(json.dumps({"prompt": ROWS[0]["prompt"], "completion": ROWS[0]["chosen"]}) + "\n")
    assert score_file(run / "best", conversations)[0]["reward"] == pytest.approx(lines[0]["chosen"], abs=1e-5)
    model, llm = load_head_model(run / "best")  # what PPO's --reward DIR does
    assert model.n_outputs == 1 and llm.model is model.body


def test_a_full_reward_run_resumes_exactly(base_dir, data, tmp_path, monkeypatch):  # noqa: F811
    def options(out, **changes):
        return AlignOptions(**{**dict(model=str(base_dir), data=str(data), out=str(out), method="full", max_steps=6,
                                      batch_size=4, lr=1e-3, eval_interval=3, progress=False), **changes})

    run_reward(options(tmp_path / "straight"), say=quiet)

    class Killed(Exception):
        pass

    def die(self, record):
        raise Killed

    with monkeypatch.context() as m:
        m.setattr(AlignReport, "on_eval", die)
        with pytest.raises(Killed):
            run_reward(options(tmp_path / "resumed"), say=quiet)
    run_reward(AlignOptions(out=tmp_path / "resumed", resume=True, progress=False), say=quiet)
    losses = [[r["loss"] for r in read_metrics(tmp_path / d / "metrics.jsonl") if "loss" in r]
              for d in ("straight", "resumed")]
    assert losses[0] == losses[1] and len(losses[0]) == 6
    x = torch.randint(0, 250, (1, 12))
    with torch.no_grad():
        a, b = (load_head_model(tmp_path / d / "last")[0](x) for d in ("straight", "resumed"))
    assert torch.equal(a, b)
