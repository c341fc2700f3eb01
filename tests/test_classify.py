"""``scratchlm finetune --task classify``: logits against a direct computation, training end to end on a tiny
model (LoRA and full, with the transfer-learning controls), exact resume, and errors with line numbers."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_llm
from scratchlm.cli import main
from scratchlm.errors import ConfigError, DataError
from scratchlm.finetune.classify import Labelled, collate_labelled, predict
from scratchlm.finetune.run import FinetuneOptions, run_finetune
from scratchlm.formats.checkpoint import save_model_dir
from scratchlm.heads import HeadModel, load_head_model

pytestmark = pytest.mark.usefixtures("one_thread")

# Label from the first word, so a tiny model can learn it in a few steps.
ROWS = [{"text": f"{word} {tail}", "label": label} for word, label in (("yes", "pos"), ("no", "neg"))
        for tail in ("it rained", "we ate", "the bus came", "a dog ran", "she sang", "time flew", "he won",
                     "they left", "it fell", "we read")]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("classify")
    llm = tiny_llm("llama", seed=0)
    save_model_dir(root / "tiny", llm.config, llm.model.canonical_state_dict(), llm.tokenizer)
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return root


def options(files, out, **changes) -> FinetuneOptions:
    base = dict(model=str(files / "tiny"), data=str(files / "train.jsonl"), out=str(out), task="classify",
                labels="neg,pos", rank=4, max_steps=12, batch_size=8, lr=2e-2, eval_interval=6, val_fraction=0.2,
                progress=False)
    return FinetuneOptions(**{**base, **changes})


def quiet(*args, **kwargs):
    pass


def test_classifier_logits_equal_the_head_on_each_texts_last_hidden_state():
    llm = tiny_llm("llama", seed=3)
    classifier = HeadModel(llm.model, 3, ["a", "b", "c"], task="classify")
    texts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    x, y = collate_labelled([Labelled(t, 0, 0) for t in texts], pad_id=0)
    with torch.no_grad():
        logits = classifier(x, y[:, 0])
        for row, ids in enumerate(texts):
            hidden = llm.model.hidden_states(torch.tensor([ids]))[0, -1]  # the text alone, no padding
            torch.testing.assert_close(logits[row], classifier.head.weight @ hidden, rtol=1e-5, atol=1e-6)


def test_classify_lora_learns_the_labels_and_saves_a_classifier(files, tmp_path):
    result = run_finetune(options(files, tmp_path / "run", max_steps=6), say=quiet)
    evals = [r for r in result.history if "val_accuracy" in r]
    assert evals[-1]["val_accuracy"] == 1.0 and evals[-1]["val_macro_f1"] == 1.0
    model, llm = load_head_model(tmp_path / "run" / "best")
    assert model.labels == ["neg", "pos"]
    assert predict(model, llm.tokenizer, ["yes we ate", "no we ate", "no he won"]) == ["pos", "neg", "neg"]
    assert json.loads((tmp_path / "run" / "run.json").read_text())["options"]["task"] == "classify"


def test_classify_full_with_frozen_blocks_sgd_and_discriminative_rates(files, tmp_path):
    from safetensors.torch import load_file

    run_finetune(options(files, tmp_path / "run", method="full", freeze_layers=1, layer_lr_decay=0.5,
                         optimizer="sgd", lr=0.3, max_steps=6), say=quiet)
    base, tuned = load_file(files / "tiny" / "model.safetensors"), load_file(tmp_path / "run" / "last" /
                                                                             "model.safetensors")
    for name, tensor in base.items():
        # Frozen: the embeddings and block 0; unused: the LM head (a classifier reads the task head instead).
        unchanged = name.startswith(("tok_embeddings.", "blocks.0.", "lm_head."))
        assert torch.equal(tensor, tuned[name]) == unchanged, name


def test_classify_resume_is_exact(files, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    # Three runs here; drawing loss.png (seconds on a busy machine) is not what this test checks.
    monkeypatch.setattr("scratchlm.align.run.plot_alignment", lambda *args, **kwargs: None)

    run_finetune(options(files, tmp_path / "a", max_steps=4, eval_interval=2, unfreeze_every=2), say=quiet)
    run_finetune(options(files, tmp_path / "b", max_steps=2, eval_interval=2, unfreeze_every=2), say=quiet)
    run_finetune(FinetuneOptions(out=str(tmp_path / "b"), max_steps=4, resume=True, progress=False), say=quiet)
    for name in ("adapter_model.safetensors", "head.safetensors"):
        a, b = load_file(tmp_path / "a" / "last" / name), load_file(tmp_path / "b" / "last" / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_classify_from_the_command_line_and_its_errors(files, tmp_path, capsys):
    code = main(["finetune", str(files / "tiny"), "--task", "classify", "--labels", "neg,pos", "--data",
                 str(files / "train.jsonl"), "--out", str(tmp_path / "cli"), "--max-steps", "2", "--batch-size", "4",
                 "--optimizer", "rmsprop", "--no-progress"])
    assert code == 0
    assert "validation accuracy" in capsys.readouterr().out
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "yes", "label": "pos"}\n{"text": "maybe", "label": "unsure"}\n')
    with pytest.raises(DataError, match="line 2: label 'unsure' is not one of --labels neg,pos"):
        run_finetune(options(files, tmp_path / "x", data=str(bad)), say=quiet)
    with pytest.raises(ConfigError, match="--labels"):
        run_finetune(options(files, tmp_path / "y", labels=None), say=quiet)
