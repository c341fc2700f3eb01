"""Word vectors and what to do with them: nearest neighbours, analogies, and how much two embeddings agree.

Shared by ``word2vec.py`` and ``autoencoder.py`` (and usable with any other [V, d] matrix, such as gensim's).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

import torch

from scratchlm.errors import ConfigError

WORD = re.compile(r"[a-z]+(?:'[a-z]+)*")


def tokenize_words(text: str) -> list[str]:
    """Lower-cased words of ``text``; apostrophes inside a word stay ("o'er", "king's"), punctuation goes."""
    return WORD.findall(text.lower())


def build_vocabulary(tokens: Sequence[str], min_count: int = 5) -> tuple[list[str], list[int]]:
    """The words seen at least ``min_count`` times, most frequent first (ties: first seen first), and their counts."""
    counts = Counter(tokens)
    kept = [(w, c) for w, c in counts.most_common() if c >= min_count]
    if not kept:
        raise ConfigError(f"no word occurs {min_count} times: lower min_count or give a longer text")
    return [w for w, _ in kept], [c for _, c in kept]


class WordVectors:
    """A vocabulary and one vector per word [V, d]; similarities are cosines."""

    def __init__(self, words: Sequence[str], vectors: torch.Tensor, counts: Sequence[int] | None = None):
        if len(words) != vectors.shape[0]:
            raise ConfigError(f"{len(words)} words but {vectors.shape[0]} vectors")
        self.words = list(words)
        self.vectors = vectors.detach().float()
        self.counts = list(counts) if counts is not None else None
        self.index = {w: i for i, w in enumerate(self.words)}
        self.unit = self.vectors / self.vectors.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def __len__(self) -> int:
        return len(self.words)

    def __contains__(self, word: str) -> bool:
        return word in self.index

    def __getitem__(self, word: str) -> torch.Tensor:
        return self.vectors[self._id(word)]

    def _id(self, word: str) -> int:
        if word not in self.index:
            raise ConfigError(f"{word!r} is not in the vocabulary ({len(self.words)} words): try a more frequent word")
        return self.index[word]

    def similarity(self, a: str, b: str) -> float:
        """cos(a, b)."""
        return float(self.unit[self._id(a)] @ self.unit[self._id(b)])

    def nearest(self, vector: torch.Tensor, k: int = 10, exclude: Sequence[str] = ()) -> list[tuple[str, float]]:
        """The ``k`` words whose vectors have the largest cosine with ``vector``, leaving out ``exclude``."""
        sims = self.unit @ (vector / vector.norm().clamp_min(1e-12))
        for word in exclude:
            if word in self.index:
                sims[self.index[word]] = float("-inf")
        top = sims.topk(min(k, len(self.words) - len(exclude)))
        return [(self.words[i], float(s)) for s, i in zip(top.values.tolist(), top.indices.tolist())]

    def most_similar(self, word: str, k: int = 10) -> list[tuple[str, float]]:
        """The ``k`` nearest neighbours of ``word`` (itself left out), with their cosines."""
        return self.nearest(self.vectors[self._id(word)], k, exclude=(word,))

    def analogy(self, a: str, b: str, c: str, k: int = 5) -> list[tuple[str, float]]:
        """a is to b as c is to ...? The words nearest to b - a + c on unit vectors (3CosAdd, Mikolov et al. 2013b:
        "king" - "man" + "woman" ~ "queen"), the three words left out."""
        target = self.unit[self._id(b)] - self.unit[self._id(a)] + self.unit[self._id(c)]
        return self.nearest(target, k, exclude=(a, b, c))

    def neighbours(self, words: Sequence[str], k: int = 10) -> dict[str, list[str]]:
        """{word: its k nearest neighbours} for each word."""
        return {w: [n for n, _ in self.most_similar(w, k)] for w in words}


def neighbour_overlap(a: dict[str, list[str]], b: dict[str, list[str]]) -> float:
    """The mean share of each word's neighbours that two embeddings have in common: |A_w & B_w| / |A_w| averaged
    over the words both lists cover (1.0: same neighbours; k / V: as if chosen at random)."""
    common = [w for w in a if w in b and a[w]]
    if not common:
        raise ConfigError("the two neighbour lists have no word in common")
    return sum(len(set(a[w]) & set(b[w])) / len(a[w]) for w in common) / len(common)


def probe_words(vectors: WordVectors, n: int = 100, skip: int = 50) -> list[str]:
    """Words to compare embeddings on: the ``n`` most frequent after skipping the ``skip`` most frequent (whose
    vectors say little: "the", "and", "of" appear next to everything)."""
    return vectors.words[skip:skip + n]
