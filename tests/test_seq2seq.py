"""The encoder-decoder translator's parts: the number task against num2words, sinusoidal positions against the
paper's formula, the model's masks, greedy and beam search (beam 1 is greedy; a full beam is exhaustive search),
saving and loading, and BLEU against sacreBLEU on its outputs."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from scratchlm.errors import ConfigError, ContextLengthError, DataError, ModelFileError
from scratchlm.seq2seq.data import collate, load_pairs, read_pairs, train_tokenizers
from scratchlm.seq2seq.model import Seq2Seq, Seq2SeqConfig
from scratchlm.seq2seq.numbers import SPLITS, english, french, sample_numbers, split_of
from scratchlm.seq2seq.positions import sinusoidal_encoding, sinusoidal_table
from scratchlm.seq2seq.search import beam_search, greedy_search
from scratchlm.seq2seq.translator import Translator

num2words = pytest.importorskip("num2words").num2words


def tiny(**changes) -> Seq2SeqConfig:
    base = dict(source_vocab_size=11, target_vocab_size=9, d_model=16, n_heads=2, n_encoder_layers=1,
                n_decoder_layers=2, d_ff=32, max_source_length=12, max_target_length=8, source_pad_id=0, pad_id=0,
                bos_id=1, eos_id=2)
    return Seq2SeqConfig(**{**base, **changes})


def random_model(seed: int = 0, **changes) -> Seq2Seq:
    torch.manual_seed(seed)
    model = Seq2Seq(tiny(**changes)).eval()
    with torch.no_grad():  # larger weights than the initialisation, so that predictions vary with the input
        for p in model.parameters():
            p.mul_(4.0)
    return model


SOURCES = [[3, 4, 5, 2], [6, 2], [7, 8, 9, 10, 3, 4, 2], [5, 5, 2]]


# ---- the number task ------------------------------------------------------------------------------------------
def test_number_words_match_num2words():
    numbers = [*range(0, 1001), *range(1001, 1_000_000, 1009), 80_000, 200_000, 200_200, 80_080, 71_000, 999_999]
    for n in numbers:
        assert french(n) == num2words(n, lang="fr"), n
        # num2words writes British English ("one hundred and six", a comma after the thousands); ours is American.
        assert english(n) == num2words(n, lang="en").replace(",", "").replace(" and ", " "), n


def test_held_out_split_is_disjoint_by_construction():
    drawn = {split: set(sample_numbers(split, 1000, seed=1)) for split in SPLITS}
    assert not drawn["train"] & drawn["test"] and not drawn["train"] & drawn["valid"]
    assert all(split_of(n) == split for split, numbers in drawn.items() for n in numbers)
    share = sum(split_of(n) == "test" for n in range(20_000)) / 20_000
    assert 0.09 < share < 0.11
    # Short numbers of the test split exist: a model must compose "seventy" and "three" it never saw together.
    assert any(n < 100 for n in drawn["test"])


# ---- positions ------------------------------------------------------------------------------------------------
def test_sinusoidal_table_is_the_papers_formula():
    table = sinusoidal_table(50, 16)
    for pos, i in itertools.product(range(50), range(8)):
        angle = pos / 10000 ** (2 * i / 16)
        assert table[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-5)
        assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-5)
    steps = torch.tensor([[0.5, 3.0], [999.0, 7.25]])  # fractional positions: diffusion timesteps
    assert sinusoidal_encoding(steps, 8).shape == (2, 2, 8)
    assert torch.allclose(sinusoidal_encoding(torch.tensor([3.0]), 16)[0], table[3])
    with pytest.raises(ValueError):
        sinusoidal_encoding(steps, 7)


# ---- the model ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("changes", [{}, {"positions": "learned", "norm_position": "post"},
                                     {"shared_vocab": True, "target_vocab_size": 11}])
def test_shapes_padding_and_causality(changes):
    model = random_model(**changes)
    source = torch.tensor([[3, 4, 5, 2], [6, 2, 0, 0]])
    target = torch.tensor([[1, 3, 4, 5], [1, 6, 7, 8]])
    logits = model(source, target)
    assert logits.shape == (2, 4, model.config.target_vocab_size)
    # The stacked form the training loop passes is the same call.
    assert torch.equal(model(torch.stack([source, target], dim=1)), logits)
    # Source padding is invisible: the second row alone, unpadded, gives the same logits.
    alone = model(source[1:, :2], target[1:])
    torch.testing.assert_close(alone, logits[1:], atol=1e-5, rtol=1e-5)
    # The decoder is causal: changing the last target token leaves every earlier position as it was.
    changed = target.clone()
    changed[:, -1] = 5
    torch.testing.assert_close(model(source, changed)[:, :-1], logits[:, :-1])
    # ...and it reads the source through cross-attention: another source changes the logits.
    assert not torch.allclose(model(torch.tensor([[7, 8, 9, 2], [6, 2, 0, 0]]), target)[0], logits[0])


def test_without_cross_attention_the_source_is_ignored():
    model = random_model(cross_attention=False)
    target = torch.tensor([[1, 3, 4]])
    a = model(torch.tensor([[3, 4, 5, 2]]), target)
    b = model(torch.tensor([[9, 2]]), target)
    assert torch.equal(a, b)
    assert not any("cross" in name for name in model.state_dict())


def test_config_errors_are_one_line():
    with pytest.raises(ConfigError, match="divisible"):
        tiny(d_model=15, n_heads=2)
    with pytest.raises(ConfigError, match="positions must be one of"):
        tiny(positions="rope")
    with pytest.raises(ConfigError, match="shared vocabulary needs equal sizes"):
        tiny(shared_vocab=True)
    with pytest.raises(ContextLengthError, match="longer than the model's 12"):
        random_model()(torch.ones(1, 13, dtype=torch.long), torch.ones(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[B, 2, W\]"):
        random_model()(torch.ones(1, 3, dtype=torch.long))


# ---- search ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_beam_of_one_is_greedy(seed):
    model = random_model(seed)
    greedy = greedy_search(model, SOURCES)
    assert beam_search(model, SOURCES, beam_size=1) == greedy
    assert beam_search(model, SOURCES, beam_size=1, length_penalty=0.0) == greedy
    # ...and greedy is the argmax chain, step by step.
    for source, out in zip(SOURCES, greedy):
        prefix = [1]
        for _ in range(len(out)):
            prefix.append(int(model(torch.tensor([source]), torch.tensor([prefix]))[0, -1].argmax()))
        assert prefix[1:] == out


@torch.no_grad()
def sequence_log_prob(model: Seq2Seq, source: list[int], tokens: list[int]) -> float:
    logits = model(torch.tensor([source]), torch.tensor([[1, *tokens[:-1]]]))[0].log_softmax(-1)
    return float(logits[torch.arange(len(tokens)), torch.tensor(tokens)].sum())


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_full_beam_is_exhaustive_search(length_penalty):
    """With a beam wider than the number of hypotheses, beam search returns the best finished one overall."""
    model = random_model(3, target_vocab_size=5, max_target_length=4)  # 3 new tokens at most
    sources = SOURCES[:2]
    found = beam_search(model, sources, beam_size=5 ** 3, length_penalty=length_penalty)
    for source, out in zip(sources, found):
        best, best_score = None, -math.inf
        for n in range(1, 4):  # n tokens, the last one the end token
            for prefix in itertools.product([0, 1, 3, 4], repeat=n - 1):
                tokens = [*prefix, 2]
                score = sequence_log_prob(model, source, tokens) / n ** length_penalty
                if score > best_score:
                    best, best_score = tokens[:-1], score
        assert out == best


def test_search_errors():
    model = random_model()
    with pytest.raises(ConfigError, match="beam size"):
        beam_search(model, SOURCES, beam_size=0)
    with pytest.raises(ContextLengthError, match="source of 13 tokens"):
        greedy_search(model, [[3] * 13])
    with pytest.raises(ConfigError, match="empty"):
        greedy_search(model, [[]])
    with pytest.raises(ConfigError, match="max_length"):
        greedy_search(model, SOURCES, max_length=50)


# ---- data, saving, BLEU ---------------------------------------------------------------------------------------
def test_collate_stacks_source_and_shifted_target():
    inputs, targets = collate([([5, 6, 2], [7, 8]), ([9, 2], [7])], source_pad_id=0, pad_id=3, bos_id=1, eos_id=2)
    assert inputs.tolist() == [[[5, 6, 2], [1, 7, 8]], [[9, 2, 0], [1, 7, 3]]]
    assert targets.tolist() == [[7, 8, 2], [7, 2, -100]]


def test_bad_data_names_the_line(tmp_path):
    (tmp_path / "pairs.tsv").write_text("one\tun\ntwo deux\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"pairs.tsv, line 2: expected source<TAB>target"):
        read_pairs(tmp_path / "pairs.tsv")
    (tmp_path / "pairs.jsonl").write_text('{"source": "one", "target": "un"}\n{"source": "two"}\n', encoding="utf-8")
    with pytest.raises(DataError, match="line 2"):
        read_pairs(tmp_path / "pairs.jsonl")
    with pytest.raises(DataError, match=r"\.tsv .* or \.jsonl"):
        read_pairs(tmp_path / "pairs.csv")
    with pytest.raises(DataError, match="no train.tsv"):
        load_pairs(tmp_path)


@pytest.mark.parametrize("shared", [False, True])
def test_save_load_translate_and_bleu_equals_sacrebleu(tmp_path, shared):
    sacrebleu = pytest.importorskip("sacrebleu")
    from scratchlm.eval.metrics import corpus_bleu
    from scratchlm.seq2seq.data import special_ids

    pairs = [(english(n), french(n)) for n in range(0, 300, 7)]
    source_tok, target_tok = train_tokenizers(pairs, 300, shared=shared)
    config = Seq2SeqConfig(source_tok.vocab_size, target_tok.vocab_size, d_model=16, n_heads=2, n_encoder_layers=1,
                           n_decoder_layers=1, d_ff=32, max_source_length=16, max_target_length=16,
                           shared_vocab=shared, **special_ids(source_tok, target_tok))
    torch.manual_seed(0)
    translator = Translator(Seq2Seq(config), source_tok, target_tok)
    translator.save(tmp_path / "t")
    names = set(__import__("safetensors.torch").torch.load_file(tmp_path / "t" / "model.safetensors"))
    assert "output.weight" not in names and (("target_embeddings.weight" in names) != shared)
    loaded = Translator.load(tmp_path / "t")
    sources = [s for s, _ in pairs]
    hypotheses = translator.translate(sources, beam_size=2)
    assert loaded.translate(sources, beam_size=2) == hypotheses
    references = [t for _, t in pairs]
    assert translator.bleu(pairs, beam_size=2)["bleu"] == pytest.approx(
        sacrebleu.corpus_bleu(hypotheses, [references]).score, abs=1e-9)
    assert corpus_bleu(references, references) == pytest.approx(100.0)
    with pytest.raises(ModelFileError, match="holds no translator"):
        Translator.load(tmp_path)
