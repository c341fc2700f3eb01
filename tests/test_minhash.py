"""MinHash and LSH (scratchlm.data.minhash) against exact Jaccard similarity and datasketch."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from scratchlm.data.minhash import (
    LSHIndex,
    Permutations,
    candidate_probability,
    estimate_jaccard,
    jaccard,
    lsh_parameters,
    minhash,
    shingle_hashes,
)
from scratchlm.errors import ConfigError

datasketch = pytest.importorskip("datasketch")

WORDS = ("river stone light cloud paper garden window silver morning letter harbour lantern meadow "
         "orchard candle thunder feather mirror valley whisper ember compass anchor blossom marble echo "
         "saddle timber velvet hollow quarry beacon thistle lagoon summit cinder ribbon falcon").split()


def planted_pair(rng: random.Random, n_words: int, n_edits: int) -> tuple[str, str]:
    """A random text and a copy with ``n_edits`` words replaced by words not in the vocabulary."""
    words = [rng.choice(WORDS) for _ in range(n_words)]
    copy = list(words)
    for position in rng.sample(range(n_words), n_edits):
        copy[position] = f"edit{rng.randrange(10**9)}"
    return " ".join(words), " ".join(copy)


def word_shingles(text: str, size: int = 5) -> set[str]:
    words = text.lower().split()
    return {" ".join(words[i:i + size]) for i in range(len(words) - size + 1)}


def test_shingle_hashes_are_the_exact_shingle_sets():
    """Our hashed shingles give the same Jaccard similarity as the sets of shingle strings (no collisions)."""
    rng = random.Random(0)
    for n_edits in (0, 3, 10, 40):
        a, b = planted_pair(rng, 200, n_edits)
        assert len(shingle_hashes(a)) == len(word_shingles(a))
        sa, sb = word_shingles(a), word_shingles(b)
        assert jaccard(shingle_hashes(a), shingle_hashes(b)) == pytest.approx(len(sa & sb) / len(sa | sb))


def test_shingles_ignore_case_punctuation_and_unicode_form():
    text = "The quick brown fox jumps over the lazy dog"
    variant = "THE  quick, brown fox -- jumps over the ｌａｚｙ dog!"  # case, punctuation, full-width letters
    assert np.array_equal(shingle_hashes(text), shingle_hashes(variant))
    assert not np.array_equal(shingle_hashes(text), shingle_hashes("The quick brown fox jumps over the lazy cat"))
    assert len(shingle_hashes("two words", size=5)) == 1  # shorter than a shingle: one shingle of everything
    assert len(shingle_hashes("  \n ")) == 0
    assert len(shingle_hashes("日本語の文章", size=2, unit="char")) == 5  # scripts without spaces: characters
    with pytest.raises(ConfigError, match="shingle unit"):
        shingle_hashes("text", unit="sentence")


def test_minhash_estimates_are_within_datasketch_error_on_planted_near_duplicates():
    """On planted pairs our estimate is as close to the exact Jaccard similarity as datasketch's MinHash."""
    rng = random.Random(1)
    k = 128
    perms = Permutations(k, seed=3)
    ours, theirs = [], []
    for trial in range(40):
        a, b = planted_pair(rng, 150, rng.randrange(1, 40))
        exact = jaccard(shingle_hashes(a), shingle_hashes(b))
        estimate = estimate_jaccard(minhash(shingle_hashes(a), perms), minhash(shingle_hashes(b), perms))
        m1, m2 = datasketch.MinHash(num_perm=k, seed=trial), datasketch.MinHash(num_perm=k, seed=trial)
        m1.update_batch([s.encode() for s in word_shingles(a)])
        m2.update_batch([s.encode() for s in word_shingles(b)])
        # Both estimators have standard deviation sqrt(J (1 - J) / k); 4 of them is a 1-in-15,000 event.
        bound = 4 * math.sqrt(exact * (1 - exact) / k) + 1 / k
        assert abs(estimate - exact) <= bound, (trial, exact, estimate)
        ours.append(abs(estimate - exact))
        theirs.append(abs(m1.jaccard(m2) - exact))
    assert np.mean(ours) <= 1.5 * np.mean(theirs) + 0.01, (np.mean(ours), np.mean(theirs))
    assert estimate_jaccard(minhash(shingle_hashes(a), perms), minhash(shingle_hashes(a), perms)) == 1.0


def test_minhash_of_a_large_set_is_blocked_but_the_same():
    hashes = np.unique(np.random.default_rng(0).integers(0, 1 << 32, size=10_000, dtype=np.uint64))
    perms = Permutations(64, seed=5)
    assert np.array_equal(minhash(hashes, perms, block=333), minhash(hashes, perms, block=1 << 20))


@pytest.mark.parametrize("threshold", [0.5, 0.7, 0.8, 0.9])
def test_lsh_parameters_are_datasketchs(threshold):
    lsh = datasketch.MinHashLSH(threshold=threshold, num_perm=128)
    assert lsh_parameters(threshold, 128) == (lsh.b, lsh.r)


def test_lsh_finds_planted_pairs_with_the_s_curve_probability():
    """Pairs of sets with Jaccard similarity s become candidates with probability 1 - (1 - s^r)^b."""
    rng = np.random.default_rng(0)
    bands, rows = 9, 13  # the shape for threshold 0.8 with 128 permutations
    trials = 250
    for similarity, common in ((0.6, 120), (0.8, 160), (0.9, 180)):
        only = (200 - common) // 2  # |A & B| / |A | B| = common / (common + 2 only) = similarity
        found = 0
        for trial in range(trials):
            universe = rng.choice(1 << 32, size=common + 2 * only, replace=False).astype(np.uint64)
            a, b = universe[:common + only], np.concatenate([universe[:common], universe[common + only:]])
            assert jaccard(a, b) == pytest.approx(similarity)
            perms = Permutations(bands * rows, seed=trial)
            index = LSHIndex(bands, rows, seed=trial)
            index.insert(minhash(a, perms), 0)
            found += index.query(minhash(b, perms)) == 0
        p = float(candidate_probability(similarity, bands, rows))
        sigma = math.sqrt(p * (1 - p) / trials)
        assert abs(found / trials - p) <= 4 * sigma + 0.02, (similarity, found / trials, p)


def test_lsh_index_returns_the_first_document_of_a_bucket_and_checks_its_shape():
    perms = Permutations(20, seed=1)
    signature = minhash(np.arange(50, dtype=np.uint64), perms)
    index = LSHIndex(4, 5)
    assert index.query(signature) is None
    index.insert(signature, 7)
    index.insert(signature, 8)
    assert index.query(signature) == 7 and index.size == 2
    assert index.approximate_bytes() > 0
    with pytest.raises(ConfigError, match="permutations"):
        LSHIndex(5, 5).band_keys(signature)
    with pytest.raises(ConfigError, match="between 0 and 1"):
        lsh_parameters(1.0, 128)
