"""``scratchlm finetune``, ``merge``, ``--adapter`` and ``eval task`` end to end on a tiny model directory."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_llm
from scratchlm.cli import main
from scratchlm.errors import TrainingError
from scratchlm.finetune.run import FinetuneOptions, run_finetune
from scratchlm.formats.checkpoint import save_model_dir
from scratchlm.llm import LLM
from scratchlm.train.report import TrainingReport, read_metrics

ROWS = [{"messages": [{"role": "user", "content": f"Repeat: {w}"}, {"role": "assistant", "content": w}]}
        for w in ["apple", "river", "stone", "cloud", "amber", "lemon", "tiger", "maple", "ocean", "piano",
                  "candle", "forest"]]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    llm = tiny_llm("llama", seed=0)
    directory = tmp_path_factory.mktemp("base") / "tiny"
    save_model_dir(directory, llm.config, llm.model.canonical_state_dict(), llm.tokenizer)
    return directory


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    return path


def options(base_dir, data, out, **changes) -> FinetuneOptions:
    base = dict(model=str(base_dir), data=str(data), out=str(out), method="lora", rank=4, alpha=8, dropout=0.1,
                max_steps=6, batch_size=4, lr=5e-3, eval_interval=3, val_fraction=0.25, progress=False)
    return FinetuneOptions(**{**base, **changes})


def quiet(*args, **kwargs):
    pass


def adapter_tensors(directory):
    from safetensors.torch import load_file

    return load_file(directory / "adapter_model.safetensors")


def test_finetune_lora_writes_adapter_checkpoints_metrics_and_plot(base_dir, data, tmp_path, capsys):
    code = main(["finetune", str(base_dir), "--data", str(data), "--out", str(tmp_path / "run"), "--rank", "4",
                 "--max-steps", "4", "--batch-size", "4", "--lr", "5e-3", "--eval-interval", "2", "--no-progress",
                 "--targets", "q,v"])
    assert code == 0
    out = capsys.readouterr().out
    assert "12 examples" in out and "11 training and 1 validation examples" in out
    run = tmp_path / "run"
    for name in ("best", "last"):
        config = json.loads((run / name / "adapter_config.json").read_text())
        assert config["target_modules"] == ["q_proj", "v_proj"] and config["r"] == 4
    assert (run / "last" / "optimizer.safetensors").is_file() and (run / "loss.png").is_file()
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in records if "val_loss" in r] == [2, 4]
    # The adapter applies at load: generate, and merge to a model directory with the same logits.
    assert main(["generate", str(base_dir), "Repeat: apple", "--adapter", str(run / "last"), "--temperature", "0",
                 "--max-new-tokens", "3"]) == 0
    assert main(["merge", str(base_dir), str(run / "last"), "--out", str(tmp_path / "merged")]) == 0
    x = torch.tensor([[5, 80, 100, 7]])
    with torch.no_grad():
        merged = LLM.load(tmp_path / "merged").model(x)
        adapted = LLM.load(base_dir, adapter=run / "last").model(x)
        base = LLM.load(base_dir).model(x)
    torch.testing.assert_close(merged, adapted)
    assert (adapted - base).abs().max() > 0
    assert main(["merge", str(base_dir), str(run / "last"), "--out", str(tmp_path / "merged")]) == 2  # no --force


def test_a_lora_run_resumes_exactly(base_dir, data, tmp_path, monkeypatch):
    run_finetune(options(base_dir, data, tmp_path / "straight"), say=quiet)

    class Killed(Exception):
        pass

    def die(self, record):
        raise Killed

    with monkeypatch.context() as m:
        m.setattr(TrainingReport, "on_eval", die)  # "killed" right after the first checkpoint (step 3)
        with pytest.raises(Killed):
            run_finetune(options(base_dir, data, tmp_path / "resumed"), say=quiet)
    torch.manual_seed(12345)  # the resume must restore every generator itself (LoRA dropout uses torch's)
    # Only the directory: the model, data and every option come from its run.json.
    run_finetune(FinetuneOptions(out=tmp_path / "resumed", resume=True, progress=False), say=quiet)
    straight, resumed = adapter_tensors(tmp_path / "straight" / "last"), adapter_tensors(tmp_path / "resumed" / "last")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    losses = [[r["loss"] for r in read_metrics(tmp_path / d / "metrics.jsonl") if "loss" in r]
              for d in ("straight", "resumed")]
    assert losses[0] == losses[1] and len(losses[0]) == 6


def test_finetune_refuses_to_overwrite_and_to_resume_with_other_settings(base_dir, data, tmp_path, capsys):
    run_finetune(options(base_dir, data, tmp_path / "r", max_steps=3), say=quiet)
    assert main(["finetune", str(base_dir), "--data", str(data), "--out", str(tmp_path / "r"), "--max-steps", "3",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "already holds a fine-tuning run" in err and "--force" in err and "--resume" in err
    with pytest.raises(TrainingError, match="rank: 4 -> 8"):
        run_finetune(options(base_dir, data, tmp_path / "r", rank=8, resume=True), say=quiet)
    assert main(["finetune", "--out", str(tmp_path / "r"), "--resume", "--lr", "1e-3", "--method", "full"]) == 2
    err = capsys.readouterr().err
    assert "lr: 0.005 -> 0.001" in err and "method: 'lora' -> 'full'" in err and len(err.strip().splitlines()) == 1
    # --max-steps may change: the run goes on to step 5, and run.json remembers the new length.
    assert main(["finetune", "--out", str(tmp_path / "r"), "--resume", "--max-steps", "5", "--no-progress"]) == 0
    assert "changed: max_steps 3 -> 5" in capsys.readouterr().out
    assert [r["step"] for r in read_metrics(tmp_path / "r" / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4, 5]
    assert json.loads((tmp_path / "r" / "run.json").read_text())["options"]["max_steps"] == 5
    # Fine-tuning reads its data again on resume, so a changed file is refused rather than silently used.
    changed = tmp_path / "changed.jsonl"
    changed.write_bytes(data.read_bytes())
    run_finetune(options(base_dir, changed, tmp_path / "c", max_steps=3), say=quiet)
    changed.write_bytes(data.read_bytes()[:-200])
    with pytest.raises(TrainingError, match="not the file this run started with"):
        run_finetune(FinetuneOptions(out=tmp_path / "c", resume=True, max_steps=4), say=quiet)
    # --force replaces the run.
    assert main(["finetune", str(base_dir), "--data", str(data), "--out", str(tmp_path / "r"), "--max-steps", "2",
                 "--no-progress", "--force"]) == 0
    assert f"wrote {tmp_path / 'r'}" in capsys.readouterr().out


def test_a_run_from_before_run_json_resumes_from_its_finetune_json(base_dir, data, tmp_path, capsys):
    out = tmp_path / "old"
    run_finetune(options(base_dir, data, out, max_steps=3), say=quiet)
    # What the previous version wrote: the options as given, relative paths and all.
    old = {**{k: v for k, v in vars(options(base_dir, data, out, max_steps=3)).items() if k != "force"},
           "overwrite": False, "targets": None}
    (out / "finetune.json").write_text(json.dumps(old, default=str), encoding="utf-8")
    (out / "run.json").unlink()
    assert main(["finetune", "--out", str(out), "--resume", "--max-steps", "4", "--no-progress"]) == 0
    assert "changed: max_steps 3 -> 4" in capsys.readouterr().out
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4]
    assert json.loads((out / "run.json").read_text())["options"]["rank"] == 4


def test_full_and_qlora_methods_train_and_save_what_llm_load_reads(base_dir, data, tmp_path):
    result = run_finetune(options(base_dir, data, tmp_path / "full", method="full", lr=1e-3), say=quiet)
    assert result.step == 6
    full = LLM.load(tmp_path / "full" / "last")
    base = LLM.load(base_dir)
    assert full.template.source == base.template.source
    assert any(not torch.equal(a, b) for a, b in zip(full.model.state_dict().values(),
                                                      base.model.state_dict().values()))
    result = run_finetune(options(base_dir, data, tmp_path / "q", method="qlora", max_steps=3), say=quiet)
    assert result.step == 3 and (tmp_path / "q" / "last" / "adapter_model.safetensors").is_file()
    LLM.load(base_dir, adapter=tmp_path / "q" / "last")  # a QLoRA adapter applies to the float base


def test_cli_reports_bad_input_as_one_line_errors(base_dir, data, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(ROWS[0]) + "\n" + "{oops\n", encoding="utf-8")
    assert main(["finetune", str(base_dir), "--data", str(bad), "--out", str(tmp_path / "x")]) == 2
    assert "line 2: not valid JSON" in capsys.readouterr().err
    assert main(["finetune", str(base_dir), "--data", str(data), "--out", str(tmp_path / "x"),
                 "--targets", "q,attention"]) == 2
    assert "valid targets for this model: q, k, v, o, gate, up, down" in capsys.readouterr().err
    assert main(["generate", str(base_dir), "hi", "--adapter", str(tmp_path)]) == 2
    assert "adapter_config.json is missing" in capsys.readouterr().err


def test_eval_task_reports_the_four_metrics(base_dir, data, tmp_path, capsys):
    assert main(["eval", "task", str(base_dir), str(data), "--limit", "4", "--max-new-tokens", "4", "--json",
                 "--predictions", str(tmp_path / "p.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "exact match" in out and "token F1" in out and "BLEU" in out and "ROUGE-L" in out
    scores = json.loads(out.strip().splitlines()[-1])
    assert scores["n"] == 4 and set(scores) == {"n", "exact_match", "token_f1", "bleu", "rouge_l"}
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert rows[0]["reference"] == "apple" and len(rows) == 4
    again = ["eval", "task", str(base_dir), str(data), "--limit", "2", "--max-new-tokens", "4",
             "--predictions", str(tmp_path / "p.jsonl")]
    assert main(again) == 2 and "--force" in capsys.readouterr().err  # never replaced silently
    assert len((tmp_path / "p.jsonl").read_text().splitlines()) == 4
    assert main([*again, "--force"]) == 0 and len((tmp_path / "p.jsonl").read_text().splitlines()) == 2


def test_serve_loads_the_adapter_given_on_its_command_line(base_dir, data, tmp_path):
    import argparse

    from scratchlm.serve.cli import load_model

    run_finetune(options(base_dir, data, tmp_path / "r", max_steps=2), say=quiet)
    args = argparse.Namespace(model=str(base_dir), dtype="float32", adapter=str(tmp_path / "r" / "last"))
    x = torch.tensor([[5, 80, 100]])
    with torch.no_grad():
        torch.testing.assert_close(load_model(args).model(x),
                                   LLM.load(base_dir, adapter=tmp_path / "r" / "last").model(x))
