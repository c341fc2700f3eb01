"""Training the translator: the shared loop's checkpoints, exact resume and files through `scratchlm seq2seq`,
the CLI's one-line errors, and the link: with cross-attention masked out, the decoder cannot learn the task."""

from __future__ import annotations

import json
import math
import random
from collections import Counter, defaultdict

import pytest
import torch
from safetensors.torch import load_file

from scratchlm.cli import main
from scratchlm.seq2seq.data import PairBatches, collate, encode_pairs, special_ids, train_tokenizers
from scratchlm.seq2seq.model import Seq2Seq, Seq2SeqConfig
from scratchlm.seq2seq.numbers import english, french
from scratchlm.seq2seq.search import greedy_search
from scratchlm.train.loop import TrainConfig, lm_loss, train

TINY = ["--d-model", "16", "--n-heads", "2", "--encoder-layers", "1", "--decoder-layers", "1", "--d-ff", "32",
        "--batch-size", "8", "--vocab-size", "300", "--bleu-pairs", "4", "--beam", "2", "--no-progress"]


def prefix_entropy(targets: list[list[int]]) -> float:
    """The least mean cross-entropy per token that any predictor seeing only the target prefix can reach on these
    sequences: the empirical entropy of the next token given the prefix (what the best such predictor pays)."""
    counts: dict[tuple, Counter] = defaultdict(Counter)
    for tokens in targets:
        for i, token in enumerate(tokens):
            counts[tuple(tokens[:i])][token] += 1
    total = sum(len(t) for t in targets)
    return sum(-n * math.log(n / sum(c.values())) for c in counts.values() for n in c.values()) / total


DIGITS_EN = "zero one two three four five six seven eight nine".split()
DIGITS_FR = "zéro un deux trois quatre cinq six sept huit neuf".split()


def test_the_decoder_needs_cross_attention():
    """Digit words read one by one ("three seven" -> "trois sept"): a tiny encoder-decoder learns it in a few hundred
    steps; the same decoder without cross-attention is a language model of French digit strings and cannot."""
    rng = random.Random(0)
    digits = [[rng.randrange(10) for _ in range(rng.randint(1, 3))] for _ in range(300)]
    pairs = [(" ".join(DIGITS_EN[d] for d in ds), " ".join(DIGITS_FR[d] for d in ds)) for ds in digits]
    source_tok, target_tok = train_tokenizers(pairs, 300)
    ids = special_ids(source_tok, target_tok)
    encoded, _ = encode_pairs(pairs, source_tok, target_tok, 8, 8)
    bound = prefix_entropy([[*t, ids["eos_id"]] for _, t in encoded])
    results = {}
    for cross in (True, False):
        config = Seq2SeqConfig(source_tok.vocab_size, target_tok.vocab_size, d_model=32, n_heads=2, n_encoder_layers=1,
                               n_decoder_layers=1, d_ff=64, max_source_length=8, max_target_length=8,
                               cross_attention=cross, **ids)
        torch.manual_seed(0)
        model = Seq2Seq(config)
        train(model, TrainConfig(max_steps=300, batch_size=32, lr=3e-3, min_lr=3e-4, warmup_steps=10,
                                 weight_decay=0.0), PairBatches(encoded, 32, ids, seed=1))
        model.eval()
        with torch.no_grad():
            x, y = collate(encoded, **ids)  # every pair once
            loss = float(lm_loss(model(x), y))
        outputs = greedy_search(model, [s for s, _ in encoded])
        results[cross] = loss, sum(out == t for out, (_, t) in zip(outputs, encoded)) / len(encoded)
    (with_loss, with_exact), (without_loss, without_exact) = results[True], results[False]
    # Without the link the decoder can do no better than the entropy of the next word given the previous ones...
    assert without_loss >= bound - 1e-4, (without_loss, bound)
    assert without_exact <= 0.1, without_exact  # (it guesses the most common one-digit strings)
    # ...which the same decoder with cross-attention, trained the same way, goes far below.
    assert with_loss < 0.5 * bound, (with_loss, bound)
    assert with_exact >= 0.5, with_exact


def write_data(folder):
    folder.mkdir()
    for split, numbers in (("train", range(0, 400, 3)), ("valid", range(1, 60, 7)), ("test", range(2, 40, 9))):
        (folder / f"{split}.tsv").write_text("".join(f"{english(n)}\t{french(n)}\n" for n in numbers),
                                             encoding="utf-8")
    return folder


@pytest.fixture
def data_dir(tmp_path):
    return write_data(tmp_path / "data")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A data folder and a translator trained on it for one step (for the CLI's error tests)."""
    root = tmp_path_factory.mktemp("seq2seq")
    data = write_data(root / "data")
    assert main(["seq2seq", "train", str(data), "--out", str(root / "model"), "--max-steps", "1", *TINY]) == 0
    return data, root / "model"


def test_train_resume_translate_bleu(data_dir, tmp_path, capsys):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(["seq2seq", "train", str(data_dir), "--out", str(straight), "--max-steps", "6",
                 "--eval-interval", "3", *TINY]) == 0
    for name in ("metrics.jsonl", "loss.png", "run.json", "results.json", "best/model.safetensors",
                 "last/optimizer.safetensors", "last/seq2seq_config.json", "last/target_tokenizer.json"):
        assert (straight / name).is_file(), name
    results = json.loads((straight / "results.json").read_text())
    assert {"test_bleu_beam1", "test_bleu_beam2", "test_exact_match_beam1", "train_seconds"} <= set(results)

    assert main(["seq2seq", "train", str(data_dir), "--out", str(resumed), "--max-steps", "3",
                 "--eval-interval", "3", *TINY]) == 0
    # Resuming takes the recorded options; only a few may change, and a model flag may not.
    assert main(["seq2seq", "train", "--out", str(resumed), "--resume", "--d-model", "32"]) == 2
    assert "cannot resume" in capsys.readouterr().err
    assert main(["seq2seq", "train", "--out", str(resumed), "--resume", "--max-steps", "6", "--no-progress"]) == 0
    a, b = load_file(straight / "last" / "model.safetensors"), load_file(resumed / "last" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit for bit the same run

    capsys.readouterr()
    assert main(["seq2seq", "translate", str(straight), "seventy-one", "two hundred", "--beam", "2"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    assert main(["seq2seq", "bleu", str(straight), str(data_dir / "test.tsv")]) == 0
    assert capsys.readouterr().out.startswith("BLEU ")
    # A new run into a folder that holds one is refused without --force.
    assert main(["seq2seq", "train", str(data_dir), "--out", str(straight), "--max-steps", "2", *TINY]) == 2
    assert "--force" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["translate", "{tmp}/nothing", "one"], "does not exist"),
    (["translate", "{model}", "one", "--beam", "0"], "beam size must be a positive integer"),
    (["translate", "{model}", " ".join(["seven"] * 40)], "longer than the model's"),
    (["bleu", "{model}", "{data}", "--split", "dev"], "has no 'dev' split"),
    (["train", "{tmp}/bad.tsv", "--out", "{tmp}/run"], "bad.tsv, line 2"),
    (["train", "{data}", "--out", "{tmp}/run2", "--d-model", "15", "--n-heads", "2", "--vocab-size", "300"],
     "divisible"),
    (["train", "--out", "{tmp}/nowhere", "--resume"], "no checkpoint to resume from"),
])
def test_cli_errors_are_one_line(args, message, trained, tmp_path, capsys):
    data_dir, model = trained
    (tmp_path / "bad.tsv").write_text("one\tun\ntwo\n", encoding="utf-8")
    capsys.readouterr()
    filled = [a.format(tmp=tmp_path, model=model, data=data_dir) for a in args]
    assert main(["seq2seq", *filled]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
