"""``scratchlm align dpo`` end to end on tiny models: step 0 is the reference (loss log 2, zero margins), training
raises the preference accuracy, resume is exact, the adapter is PEFT's format, and mistakes are one-line errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import byte_tokenizer, tiny_llm
from scratchlm.align.dpo import dpo_loss, run_dpo
from scratchlm.align.run import AlignOptions, AlignReport, adapters_disabled
from scratchlm.cli import main
from scratchlm.errors import ConfigError, TrainingError
from scratchlm.finetune.lora import LoraSettings, apply_lora, lora_layers
from scratchlm.formats.checkpoint import save_model_dir
from scratchlm.llm import LLM
from scratchlm.train.report import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")
WORDS = ["apple", "river", "stone", "cloud", "amber", "lemon", "tiger", "maple", "ocean", "piano", "candle", "forest"]
ROWS = [{"prompt": f"Say {w}", "chosen": f"{w.upper()}!", "rejected": f"well, {w}"} for w in WORDS]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    llm = tiny_llm("llama", seed=0)
    directory = tmp_path_factory.mktemp("base") / "tiny"
    save_model_dir(directory, llm.config, llm.model.canonical_state_dict(), llm.tokenizer)
    return directory


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    return path


def options(base_dir, data, out, **changes) -> AlignOptions:
    base = dict(model=str(base_dir), data=str(data), out=str(out), rank=4, alpha=8, max_steps=6, batch_size=4,
                lr=5e-3, eval_interval=3, val_fraction=0.25, progress=False)
    return AlignOptions(**{**base, **changes})


def quiet(*args, **kwargs):
    pass


def steps(out):
    return [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


@pytest.mark.parametrize("method", ["lora", "full"])
def test_step_zero_is_the_reference_and_training_separates_the_answers(base_dir, data, tmp_path, method):
    lr = 5e-3 if method == "lora" else 1e-3
    result = run_dpo(options(base_dir, data, tmp_path / "run", method=method, lr=lr), say=quiet)
    first = steps(tmp_path / "run")[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["margin"] == 0.0 and first["rewards_chosen"] == 0.0 and first["rewards_rejected"] == 0.0
    evals = [r for r in result.history if "val_loss" in r]
    assert evals[-1]["val_loss"] < math.log(2) and evals[-1]["val_margin"] > 0
    assert evals[-1]["val_accuracy"] >= 2 / 3
    assert (tmp_path / "run" / "loss.png").stat().st_size > 0
    assert json.loads((tmp_path / "run" / "run.json").read_text())["command"] == "align dpo"


def test_ipo_starts_at_its_target_margin_squared(base_dir, data, tmp_path):
    run_dpo(options(base_dir, data, tmp_path / "ipo", loss="ipo", beta=0.5, max_steps=2), say=quiet)
    assert steps(tmp_path / "ipo")[0]["loss"] == pytest.approx((1 / (2 * 0.5)) ** 2, abs=1e-6)


def test_dpo_loss_by_hand():
    chosen, rejected = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -2.0])
    ref_chosen, ref_rejected = torch.tensor([-3.5, -5.0]), torch.tensor([-3.0, -2.5])
    losses, rc, rr = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.2)
    h = torch.tensor([0.5 - (-1.0), 0.0 - 0.5])
    torch.testing.assert_close(losses, torch.log1p(torch.exp(-0.2 * h)))
    torch.testing.assert_close(rc - rr, 0.2 * h)
    losses, _, _ = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.2, loss="ipo",
                            chosen_tokens=torch.tensor([2, 1]), rejected_tokens=torch.tensor([4, 5]))
    per_token = torch.tensor([0.5 / 2 + 1.0 / 4, 0.0 - 0.5 / 5])
    torch.testing.assert_close(losses, (per_token - 1 / 0.4) ** 2)
    with pytest.raises(ConfigError, match="unknown DPO loss"):
        dpo_loss(chosen, rejected, ref_chosen, ref_rejected, 0.1, loss="hinge")


def test_adapters_disabled_gives_the_base_model_back():
    llm = tiny_llm()
    x = torch.randint(0, 250, (2, 9))
    with torch.no_grad():
        base = llm.model(x)
        apply_lora(llm.model, LoraSettings(rank=2, alpha=4), seed=0)
        for layer in lora_layers(llm.model).values():
            torch.nn.init.normal_(layer.lora_B.weight, std=0.1)
        adapted = llm.model(x)
        with adapters_disabled(llm.model):
            off = llm.model(x)
        again = llm.model(x)
    assert (adapted - base).abs().max() > 1e-3
    torch.testing.assert_close(off, base, rtol=0, atol=0)
    torch.testing.assert_close(again, adapted, rtol=0, atol=0)


def test_a_dpo_run_resumes_exactly(base_dir, data, tmp_path, monkeypatch):
    run_dpo(options(base_dir, data, tmp_path / "straight", dropout=0.1), say=quiet)

    class Killed(Exception):
        pass

    def die(self, record):
        raise Killed

    with monkeypatch.context() as m:
        m.setattr(AlignReport, "on_eval", die)  # "killed" right after the first checkpoint (step 3)
        with pytest.raises(Killed):
            run_dpo(options(base_dir, data, tmp_path / "resumed", dropout=0.1), say=quiet)
    torch.manual_seed(12345)  # the resume restores every generator itself (LoRA dropout uses torch's)
    run_dpo(AlignOptions(out=tmp_path / "resumed", resume=True, progress=False), say=quiet)
    from safetensors.torch import load_file

    straight, resumed = (load_file(tmp_path / d / "last" / "adapter_model.safetensors")
                         for d in ("straight", "resumed"))
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
    losses = [[(r["loss"], r["margin"]) for r in steps(tmp_path / d)] for d in ("straight", "resumed")]
    assert losses[0] == losses[1] and len(losses[0]) == 6
    with pytest.raises(TrainingError, match="beta: 0.1 -> 0.3"):
        run_dpo(AlignOptions(out=tmp_path / "resumed", resume=True, beta=0.3, progress=False), say=quiet)


def test_the_cli_trains_an_adapter_that_loads_merges_and_refuses_mistakes(base_dir, data, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["align", "dpo", str(base_dir), "--data", str(data), "--out", str(run), "--beta", "0.2", "--rank", "4",
            "--max-steps", "3", "--batch-size", "4", "--lr", "5e-3", "--targets", "q,v", "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "12 preference pairs" in out and "validation preference accuracy" in out
    adapter = run / "best"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and sorted(config["target_modules"]) == ["q_proj",
                                                                                                         "v_proj"]
    x = torch.randint(0, 250, (1, 12))
    with torch.no_grad():
        adapted = LLM.load(base_dir, adapter=adapter).model(x)
        base = LLM.load(base_dir).model(x)
    assert (adapted - base).abs().max() > 1e-4
    assert main(["merge", str(base_dir), str(adapter), "--out", str(tmp_path / "merged")]) == 0
    with torch.no_grad():
        torch.testing.assert_close(LLM.load(tmp_path / "merged").model(x), adapted, atol=1e-5, rtol=1e-5)
    capsys.readouterr()
    assert main(args) == 2  # the run exists: not replaced without --force
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume" in err and "--force" in err and len(err.splitlines()) == 1
    assert main(args + ["--force", "--beta", "-1"]) == 2
    assert "--beta must be positive" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps({**ROWS[1], "rejected": ROWS[1]["chosen"]}) + "\n")
    assert main(["align", "dpo", str(base_dir), "--data", str(bad), "--out", str(tmp_path / "b"), "--no-progress"]) == 2
    assert "bad.jsonl, line 2: \"chosen\" and \"rejected\" are identical" in capsys.readouterr().err


def test_peft_reads_the_dpo_adapter(tmp_path, data):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=260, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      tie_word_embeddings=False, rms_norm_eps=1e-5)
    hf_dir = tmp_path / "hf"
    transformers.LlamaForCausalLM(config).save_pretrained(hf_dir)
    byte_tokenizer().save(hf_dir / "tokenizer.json")
    run_dpo(options(hf_dir, data, tmp_path / "run", max_steps=2, val_fraction=0.0), say=quiet)
    x = torch.randint(0, 250, (2, 10))
    with torch.no_grad():
        ours = LLM.load(hf_dir, adapter=tmp_path / "run" / "last").model(x)
        hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
        theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "run" / "last").eval()(x).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_a_new_run_over_an_old_one_never_reuses_its_reference_cache(base_dir, data, tmp_path):
    run_dpo(options(base_dir, data, tmp_path / "run", max_steps=1, val_fraction=0.0), say=quiet)
    other = tmp_path / "other.jsonl"  # as many pairs, other answers: the old cache would fit their shapes
    other.write_text("".join(json.dumps({**r, "chosen": r["chosen"] + " Yes."}) + "\n" for r in ROWS))
    run_dpo(options(base_dir, other, tmp_path / "run", max_steps=1, val_fraction=0.0, force=True), say=quiet)
    assert steps(tmp_path / "run")[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
