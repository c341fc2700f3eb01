"""Word embeddings (scratchlm.lessons.word2vec, autoencoder, vectors) against gensim's Word2Vec on the same text."""

from __future__ import annotations

from importlib.resources import files

import pytest
import torch

from scratchlm.errors import ConfigError
from scratchlm.lessons.autoencoder import cooccurrence, train_autoencoder_embedding
from scratchlm.lessons.vectors import WordVectors, build_vocabulary, neighbour_overlap, probe_words, tokenize_words
from scratchlm.lessons.word2vec import Word2VecConfig, keep_probabilities, skipgram_pairs, train_word2vec

gensim = pytest.importorskip("gensim")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokens() -> list[str]:
    text = files("scratchlm").joinpath("data/shakespeare.txt").read_text(encoding="utf-8")
    return tokenize_words(text[:200_000])


def gensim_model(tokens: list[str], config: Word2VecConfig, seed: int):
    from gensim.models import Word2Vec

    sentences = [tokens[i:i + 10_000] for i in range(0, len(tokens), 10_000)]
    return Word2Vec(sentences, vector_size=config.vector_size, window=config.window, min_count=config.min_count,
                    sample=config.sample, negative=config.negative, ns_exponent=config.ns_exponent, sg=1,
                    epochs=config.epochs, seed=seed, workers=1)


def test_vocabulary_and_subsampling_match_gensim(tokens):
    config = Word2VecConfig()
    model = gensim_model(tokens[:20_000], Word2VecConfig(epochs=1), seed=1)
    words, counts = build_vocabulary(tokens[:20_000], config.min_count)
    assert set(words) == set(model.wv.index_to_key)
    assert counts == sorted(counts, reverse=True)
    keep = keep_probabilities(torch.tensor(counts), config.sample).clamp(max=1.0)
    # gensim stores each word's keep probability as an integer threshold out of 2**32.
    theirs = torch.tensor([model.wv.get_vecattr(w, "sample_int") / 2**32 for w in words], dtype=torch.float)
    assert torch.allclose(keep, theirs, atol=1e-6)
    assert keep[0] < 0.5 and keep[-1] == 1.0  # the most frequent word is mostly dropped, rare ones always kept


def test_skipgram_pairs_use_a_dynamic_window():
    ids = torch.arange(200)
    g = torch.Generator().manual_seed(0)
    centres, contexts = skipgram_pairs(ids, 1, g)
    assert sorted(zip(centres.tolist(), contexts.tolist())) == sorted(
        [(i, i + 1) for i in range(199)] + [(i + 1, i) for i in range(199)])
    centres, contexts = skipgram_pairs(torch.arange(20_000), 4, g)
    distance = (contexts - centres).abs()
    assert distance.min() == 1 and distance.max() == 4
    # A centre's window b is uniform in 1..4, so offset o is used with probability (4 - o + 1) / 4.
    shares = torch.stack([(distance == o).float().sum() for o in range(1, 5)]) / (2 * 20_000)
    assert torch.allclose(shares, torch.tensor([1.0, 0.75, 0.5, 0.25]), atol=0.02)


def test_our_neighbours_agree_with_gensim_as_much_as_gensim_agrees_with_itself(tokens):
    config = Word2VecConfig(vector_size=50, epochs=3)
    ours, losses = train_word2vec(tokens, config)
    assert losses[-1] < losses[0]
    runs = [gensim_model(tokens, config, seed) for seed in (1, 2)]
    theirs = [WordVectors(m.wv.index_to_key, torch.tensor(m.wv.vectors)) for m in runs]
    assert set(ours.words) == set(theirs[0].words)
    words = probe_words(ours, 50, 50)
    ours_n, g1, g2 = ours.neighbours(words), theirs[0].neighbours(words), theirs[1].neighbours(words)
    ours_vs_gensim = (neighbour_overlap(ours_n, g1) + neighbour_overlap(ours_n, g2)) / 2
    gensim_vs_gensim = neighbour_overlap(g1, g2)  # word2vec is random: this is the ceiling
    chance = 10 / (len(ours) - 1)
    assert ours_vs_gensim > 3 * chance
    assert ours_vs_gensim > 0.5 * gensim_vs_gensim, (ours_vs_gensim, gensim_vs_gensim)

    auto, auto_losses = train_autoencoder_embedding(tokens, n_context=500, steps=100)
    assert auto_losses[-1] < 0.8 * auto_losses[0]
    assert auto.words == ours.words
    assert neighbour_overlap(auto.neighbours(words), g1) > 3 * chance


def test_cooccurrence_weights_by_distance():
    counts = cooccurrence(torch.tensor([0, 1, 2]), vocab_size=3, n_context=3, window=2)
    expected = torch.tensor([[0, 1, 0.5], [1, 0, 1], [0.5, 1, 0]])
    assert torch.allclose(counts, expected)


def test_word_vectors_neighbours_and_analogies():
    vectors = WordVectors(["king", "queen", "man", "woman", "apple"],
                          torch.tensor([[1.0, 1.0, 0], [1.0, -1.0, 0], [0, 1.0, 0], [0, -1.0, 0], [0, 0, 1.0]]))
    assert vectors.most_similar("king", 1)[0][0] == "man"
    assert vectors.analogy("man", "woman", "king", 1)[0][0] == "queen"
    assert vectors.similarity("king", "apple") == pytest.approx(0.0)
    with pytest.raises(ConfigError, match="not in the vocabulary"):
        vectors.most_similar("prince")
    assert neighbour_overlap({"a": ["x", "y"]}, {"a": ["y", "z"]}) == 0.5
    with pytest.raises(ConfigError):
        build_vocabulary(["a", "b"], min_count=5)
    with pytest.raises(ConfigError):
        Word2VecConfig(window=0)
