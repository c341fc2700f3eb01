"""The attention lesson (scratchlm.lessons.lookup, attention, cheating): each step does what the notebook says."""

from __future__ import annotations

import functools
import math
from importlib.resources import files

import pytest
import torch
import torch.nn.functional as F

from scratchlm.errors import ConfigError
from scratchlm.lessons import attention as att
from scratchlm.lessons import lookup
from scratchlm.lessons.cheating import compare_masking, known_word_rate

pytestmark = pytest.mark.usefixtures("one_thread")


def test_translate_word_by_word_marks_unknown_words():
    assert lookup.translate("The cat eats fish.", lookup.EN_FR) == "le chat mange poisson"
    assert lookup.translate("the cta", lookup.EN_FR) == "le [cta?]"
    assert lookup.fuzzy_translate("the cta eats fsh", lookup.EN_FR) == "le chat mange poisson"


@pytest.mark.parametrize("a,b", [("kitten", "sitting"), ("", "abc"), ("flaw", "lawn"), ("same", "same"),
                                 ("intention", "execution"), ("ab", "ba")])
def test_levenshtein_matches_the_recursive_definition(a, b):
    @functools.cache
    def reference(x: str, y: str) -> int:  # the textbook recursion, obviously right (memoised)
        if not x or not y:
            return len(x) + len(y)
        return min(reference(x[1:], y) + 1, reference(x, y[1:]) + 1, reference(x[1:], y[1:]) + (x[0] != y[0]))

    assert lookup.levenshtein(a, b) == reference(a, b) == lookup.levenshtein(b, a)


def test_fuzzy_lookup_takes_the_nearest_key_within_the_limit():
    match = lookup.fuzzy_lookup("hous", lookup.EN_FR)
    assert (match.key, match.value, match.distance) == ("house", "maison", 1)
    assert lookup.fuzzy_lookup("xylophone", lookup.EN_FR, max_distance=2) is None
    with pytest.raises(ConfigError):
        lookup.fuzzy_lookup("a", {})


def test_matrix_product_lookup_equals_the_dict_lookup():
    m = lookup.dictionary_matrices(lookup.EN_FR)
    for key, value in lookup.EN_FR.items():
        assert lookup.matrix_lookup(key, m) == value
    assert lookup.matrix_lookup("giraffe", m) is None
    # The scores row is exactly the one-hot of the key: a lookup selects one row of V.
    q = m.query("dog")
    assert torch.equal(q @ m.K.T, lookup.one_hot(m.keys.index("dog"), len(m.keys)))


def test_soft_lookup_tends_to_the_hard_lookup_as_temperature_falls():
    m = lookup.dictionary_matrices(lookup.EN_FR)
    features = lookup.ngram_features(m.keys)
    keys = lookup.ngram_vectors(m.keys, features)
    for word in ("cat", "garden", "gardn", "frend"):
        query = lookup.ngram_vectors([word], features)[0]
        best = int(lookup.cosine_similarities(query, keys).argmax())
        hard = m.V[best]
        gaps = []
        for temperature in (1.0, 0.3, 0.1, 0.03, 0.01):
            output, weights = lookup.soft_lookup(query, keys, m.V, temperature)
            assert weights.sum().item() == pytest.approx(1.0, abs=1e-5)
            gaps.append((output - hard).abs().max().item())
        assert all(b <= a + 1e-7 for a, b in zip(gaps, gaps[1:])), gaps  # closer at every step
        assert gaps[-1] < 1e-3 < gaps[0]
    # At temperature 1 the weights are spread over every key (no weight is 0), at 0.01 one key has them all.
    query = lookup.ngram_vectors(["cat"], features)[0]
    assert lookup.soft_lookup(query, keys, m.V, 1.0)[1].min() > 0.01
    assert lookup.soft_lookup(query, keys, m.V, 0.01)[1].max() > 0.999
    # A misspelt word finds its value through the soft lookup, as through Levenshtein.
    assert lookup.soft_translate_word("gardn", lookup.EN_FR)[0] == "jardin"
    with pytest.raises(ConfigError):
        lookup.soft_lookup(query, keys, m.V, 0.0)


@pytest.mark.parametrize("causal", [True, False])
def test_lesson_attention_equals_torch_sdpa(causal):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8)
    mask = att.causal_mask(7) if causal else None
    ours, weights = att.attention(q, k, v, mask)
    assert torch.allclose(ours, F.scaled_dot_product_attention(q, k, v, is_causal=causal), atol=1e-6)
    assert torch.allclose(weights.sum(-1), torch.ones(2, 3, 7))
    if causal:
        assert weights.triu(1).abs().max() == 0  # no query sees a later key

    layer = att.SelfAttention(16, 4, causal=causal)
    x = torch.randn(2, 5, 16)
    assert torch.allclose(layer(x), att.sdpa_reference(layer, x), atol=1e-6)
    assert layer.last_weights.shape == (2, 4, 5, 5)


def test_self_attention_loads_into_the_models_attention():
    """The lesson's layer and model.Attention compute the same function from the same weights."""
    from scratchlm.config import ModelConfig
    from scratchlm.model import Attention, AttentionMask

    config = ModelConfig(vocab_size=10, context_length=8, d_model=16, n_layers=1, n_heads=4,
                         positions="learned")
    torch.manual_seed(0)
    ours = att.SelfAttention(16, 4, causal=True)
    theirs = Attention(config)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 6, 16)
    expected = theirs(x, None, None, torch.arange(6).expand(2, 6), AttentionMask(None, True, 6))
    assert torch.allclose(ours(x), expected, atol=1e-6)


def test_plot_attention_labels_the_tokens():
    import matplotlib

    matplotlib.use("Agg")
    weights = torch.softmax(torch.randn(3, 3), -1)
    ax = att.plot_attention(weights, ["a", " b", "\n"], title="t")
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", " b", "\\n"]
    import matplotlib.pyplot as plt

    plt.close(ax.figure)


def test_the_model_cheats_without_the_mask_and_stops_with_it():
    text = files("scratchlm").joinpath("data/shakespeare.txt").read_text(encoding="utf-8")[:100_000]
    runs = compare_masking(text, steps=150, context=16, d_model=32, n_layers=1, sample_tokens=60)
    cheat, honest = runs["no mask"], runs["causal mask"]
    # Training (the loss training sees) rewards the cheater: it copies the next token from its input...
    assert cheat.training_loss < honest.training_loss - 0.3
    # ...but generation cannot peek, and there it is worse than the causal twin, worse than it looked in training.
    assert cheat.honest_loss > honest.honest_loss + 0.3
    assert cheat.honest_loss > cheat.training_loss + 1.0
    # The causal model's two losses are one and the same thing (the mask already hides the future).
    assert honest.honest_loss == pytest.approx(honest.training_loss, abs=1e-4)
    assert honest.honest_loss < math.log(len(set(text)))  # and better than uniform guessing


def test_known_word_rate():
    assert known_word_rate("the king, the queen", {"the", "king"}) == pytest.approx(0.75)
    assert known_word_rate("...", {"the"}) == 0.0
