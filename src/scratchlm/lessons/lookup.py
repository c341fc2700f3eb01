"""Attention from a dictionary: four steps from ``dict[key]`` to a softmax over similarities.

1. A translator that looks each word up in a dictionary (``translate``). A word that is not a key fails.
2. Fuzzy keys: take the key nearest to the word by Levenshtein distance (``fuzzy_lookup``), so "hous" finds "house".
3. One-hot vectors: write keys and values as the rows of two 0/1 matrices K and V; the query "cat" is a one-hot
   row q, ``q @ K.T`` is 1 at the matching key and 0 elsewhere, and multiplying that by V gives the value's row.
   A dictionary lookup is two matrix products (``matrix_lookup``).
4. Soft lookup: describe each word by a vector of its letter trigrams instead of a one-hot, score every key by
   cosine similarity, and mix the values by ``softmax(scores / temperature)`` (``soft_lookup``). As the temperature
   falls to 0 the softmax becomes the one-hot of the best key, step 2's lookup again; at temperature 1 every key
   contributes a little. That mix, with learned vectors, is attention (Vaswani et al. 2017, eq. 1): the query is
   compared with every key and the answer is a weighted sum of the values. See ``attention.py``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from scratchlm.errors import ConfigError

# A tiny English -> French dictionary for the lesson (one word each way, no grammar: that is the point).
EN_FR: dict[str, str] = {
    "the": "le", "cat": "chat", "dog": "chien", "house": "maison", "is": "est", "in": "dans", "big": "grand",
    "small": "petit", "black": "noir", "white": "blanc", "eats": "mange", "fish": "poisson", "bread": "pain",
    "and": "et", "a": "un", "garden": "jardin", "sleeps": "dort", "my": "mon", "friend": "ami", "red": "rouge",
}

WORD = re.compile(r"[\w']+")


def words(sentence: str) -> list[str]:
    """The lower-cased words of a sentence (punctuation dropped)."""
    return WORD.findall(sentence.lower())


def translate(sentence: str, dictionary: dict[str, str],
              lookup: Callable[[str, dict[str, str]], str | None] | None = None) -> str:
    """Translate word by word. ``lookup(word, dictionary)`` returns the translation or None (default: exact
    ``dictionary.get``); a word without one is kept as ``[word?]``."""
    lookup = lookup or (lambda word, d: d.get(word))
    out = []
    for word in words(sentence):
        found = lookup(word, dictionary)
        out.append(found if found is not None else f"[{word}?]")
    return " ".join(out)


def levenshtein(a: str, b: str) -> int:
    """Edit distance: the fewest insertions, deletions and substitutions of one character that turn a into b.

    Wagner & Fischer's dynamic programme (1974): ``row[j]`` holds the distance between the first i characters
    of a and the first j of b, one row of the table at a time.
    """
    row = list(range(len(b) + 1))  # from "" to b[:j]: j insertions
    for i, ca in enumerate(a, start=1):
        previous_diagonal, row[0] = row[0], i
        for j, cb in enumerate(b, start=1):
            substitute = previous_diagonal + (ca != cb)
            previous_diagonal = row[j]
            row[j] = min(row[j] + 1, row[j - 1] + 1, substitute)  # delete from a, insert into a, substitute
    return row[-1]


@dataclass(frozen=True)
class FuzzyMatch:
    key: str
    value: str
    distance: int


def fuzzy_lookup(word: str, dictionary: dict[str, str], max_distance: int | None = None) -> FuzzyMatch | None:
    """The entry whose key is nearest to ``word`` by Levenshtein distance (ties: the key listed first), or None
    when even the nearest is further than ``max_distance``."""
    if not dictionary:
        raise ConfigError("the dictionary is empty: give it at least one key")
    key = min(dictionary, key=lambda k: levenshtein(word, k))
    distance = levenshtein(word, key)
    if max_distance is not None and distance > max_distance:
        return None
    return FuzzyMatch(key, dictionary[key], distance)


def fuzzy_translate(sentence: str, dictionary: dict[str, str], max_distance: int = 2) -> str:
    """``translate`` with fuzzy keys: each word takes the value of the nearest key within ``max_distance`` edits."""

    def lookup(word: str, d: dict[str, str]) -> str | None:
        match = fuzzy_lookup(word, d, max_distance)
        return match.value if match else None

    return translate(sentence, dictionary, lookup)


# ---------------------------------------------------------------------------------------------------------------
# Step 3: one-hot vectors; a lookup is a matrix product.


def one_hot(index: int, size: int) -> torch.Tensor:
    """A row of ``size`` zeros with a single 1 at ``index``."""
    vector = torch.zeros(size)
    vector[index] = 1.0
    return vector


@dataclass
class DictionaryMatrices:
    """A dictionary as matrices: ``K`` [n_keys, n_keys] holds one one-hot row per key, ``V`` [n_keys, n_values]
    the one-hot of each key's value; ``keys`` and ``values`` name the columns."""

    keys: list[str]
    values: list[str]
    K: torch.Tensor
    V: torch.Tensor

    def query(self, word: str) -> torch.Tensor:
        """The one-hot row of ``word`` over the keys (all zeros for a word that is not a key)."""
        if word in self.keys:
            return one_hot(self.keys.index(word), len(self.keys))
        return torch.zeros(len(self.keys))


def dictionary_matrices(dictionary: dict[str, str]) -> DictionaryMatrices:
    """Keys and values of ``dictionary`` as one-hot matrices (values are deduplicated, in order of appearance)."""
    keys = list(dictionary)
    values = list(dict.fromkeys(dictionary.values()))
    K = torch.eye(len(keys))
    V = torch.stack([one_hot(values.index(dictionary[k]), len(values)) for k in keys]) if keys else torch.zeros(0, 0)
    return DictionaryMatrices(keys, values, K, V)


def matrix_lookup(word: str, m: DictionaryMatrices) -> str | None:
    """Look ``word`` up with two matrix products: scores = q K^T picks the key, scores V picks its value."""
    q = m.query(word)  # (n_keys,)
    scores = q @ m.K.T  # (n_keys,): 1 at the matching key, 0 elsewhere
    out = scores @ m.V  # (n_values,): the one-hot of the value, or all zeros
    if out.sum() == 0:
        return None
    return m.values[int(out.argmax())]


# ---------------------------------------------------------------------------------------------------------------
# Step 4: vectors that can be near each other; softmax over cosine similarities.


def char_ngrams(word: str, n: int = 3) -> list[str]:
    """The letter n-grams of ``word`` with boundary marks: "cat" -> "<ca", "cat", "at>" (fastText's idea,
    Bojanowski et al. 2017), so that words spelt alike share features."""
    padded = f"<{word}>"
    if len(padded) <= n:
        return [padded]
    return [padded[i:i + n] for i in range(len(padded) - n + 1)]


def ngram_vectors(items: Sequence[str], features: Sequence[str], n: int = 3) -> torch.Tensor:
    """One row per item [len(items), len(features)]: how often each feature n-gram occurs in it (n-grams not
    among ``features`` are dropped)."""
    column = {f: i for i, f in enumerate(features)}
    out = torch.zeros(len(items), len(features))
    for row, item in enumerate(items):
        for gram in char_ngrams(item, n):
            if gram in column:
                out[row, column[gram]] += 1
    return out


def ngram_features(keys: Sequence[str], n: int = 3) -> list[str]:
    """Every n-gram of the keys, in order of first appearance: the columns of ``ngram_vectors``."""
    return list(dict.fromkeys(g for k in keys for g in char_ngrams(k, n)))


def cosine_similarities(query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """cos(query, key_i) for each row of ``keys`` [N, F]; a zero vector has similarity 0 with everything."""
    q = query / query.norm().clamp_min(1e-12)
    k = keys / keys.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return k @ q


def soft_lookup(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, temperature: float = 1.0
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention with fixed vectors: weights = softmax(cos(query, keys) / temperature), output = weights @ values.

    Returns (output [n_value_columns], weights [N]). At temperature -> 0 the weights become the one-hot of the
    most similar key (the hard lookup); large temperatures average all values evenly.
    """
    if temperature <= 0:
        raise ConfigError(f"temperature must be positive, got {temperature}")
    weights = torch.softmax(cosine_similarities(query, keys) / temperature, dim=-1)
    return weights @ values, weights


def soft_translate_word(word: str, dictionary: dict[str, str], temperature: float = 0.1, n: int = 3
                        ) -> tuple[str, torch.Tensor, DictionaryMatrices]:
    """One word through the soft lookup: letter-trigram vectors for the query and the keys, one-hot values.

    Returns (the value with the largest weight, the weights over the values, the dictionary's matrices)."""
    m = dictionary_matrices(dictionary)
    features = ngram_features(m.keys, n)
    keys = ngram_vectors(m.keys, features, n)
    query = ngram_vectors([word], features, n)[0]
    mixed, _ = soft_lookup(query, keys, m.V, temperature)
    return m.values[int(mixed.argmax())], mixed, m
