"""Near-duplicate detection: shingles, MinHash signatures and banded locality-sensitive hashing.

    shingles = shingle_hashes("the cat sat on the mat", size=5)       # one 32-bit hash per 5-word shingle
    perms = Permutations(num_perm=128, seed=1)
    sig = minhash(shingles, perms)                                     # 128 minima, uint32
    estimate_jaccard(sig, minhash(other, perms))                       # ~ |A & B| / |A | B|
    bands, rows = lsh_parameters(threshold=0.8, num_perm=128)          # (9, 13)
    index = LSHIndex(bands, rows)
    index.query(sig)        # the first indexed document sharing a band with sig, or None
    index.insert(sig, doc_id)

Broder (1997), "On the resemblance and containment of documents": a document is the set of its w-shingles
(runs of w consecutive words); the resemblance of two documents is the Jaccard similarity of those sets. For a
random permutation of the shingle universe, the probability that two sets have the same minimum equals their
Jaccard similarity, so the fraction of equal minima over k independent permutations estimates it with standard
deviation sqrt(J (1 - J) / k). Permutations are approximated by universal hashes h(x) = (a x + b) mod p
(Carter and Wegman 1979) with p = 2^61 - 1, as datasketch does.

Banding (Leskovec, Rajaraman and Ullman, "Mining of Massive Datasets", ch. 3.4): cut the k minima into b bands of
r rows; two documents become candidates when all r rows of at least one band agree, which happens with
probability 1 - (1 - s^r)^b for Jaccard similarity s: an S-curve whose steepest point sits near (1/b)^(1/r).
``lsh_parameters`` picks b and r for a threshold by minimising the areas of false positives below it and false
negatives above it, the criterion of datasketch's ``MinHashLSH``.
"""

from __future__ import annotations

import unicodedata
import zlib
from dataclasses import dataclass, field

import numpy as np
import regex

from scratchlm.errors import ConfigError

MERSENNE_PRIME = np.uint64((1 << 61) - 1)
MAX_HASH = np.uint64(0xFFFFFFFF)
MASK32 = np.uint64(0xFFFFFFFF)
SHINGLE_UNITS = ("word", "char")
_WORD = regex.compile(r"\w+")
_SPACES = regex.compile(r"\s+")


def normalise_for_shingles(text: str) -> str:
    """Case-folded NFKC text: variants in case or in Unicode form make the same shingles."""
    return unicodedata.normalize("NFKC", text).casefold()


def _combine(units: np.ndarray, size: int, seed: int = 0x9E3779B1) -> np.ndarray:
    """32-bit hashes of every run of ``size`` consecutive unit hashes (a polynomial hash mod 2^32).

    Each position j of the run gets its own odd multiplier, so "a b" and "b a" hash apart; products of two
    32-bit numbers fit in 64 bits, so numpy's uint64 arithmetic is exact before the final mask.
    """
    if len(units) <= size:  # a text shorter than one shingle is one shingle of all its units
        size = len(units)
    multipliers = np.random.default_rng(seed).integers(1, 1 << 32, size=size, dtype=np.uint64) | np.uint64(1)
    n = len(units) - size + 1
    out = np.zeros(n, dtype=np.uint64)
    for j in range(size):
        out = (out + units[j:j + n] * multipliers[j]) & MASK32
    return out


def shingle_hashes(text: str, size: int = 5, unit: str = "word") -> np.ndarray:
    """The distinct 32-bit hashes of the ``size``-shingles of ``text`` (uint64 array; empty for blank text).

    ``unit="word"``: runs of ``size`` words (``\\w+``, case-folded), Broder's w-shingles; punctuation and
    spacing do not matter. ``unit="char"``: runs of ``size`` characters of the case-folded text with spacing
    collapsed, for scripts written without spaces (Chinese, Japanese, Thai).
    """
    if size < 1:
        raise ConfigError(f"shingle size must be at least 1, got {size}")
    text = normalise_for_shingles(text)
    if unit == "word":
        words = _WORD.findall(text)
        if not words:
            return np.zeros(0, dtype=np.uint64)
        units = np.fromiter((zlib.crc32(w.encode("utf-8")) for w in words), dtype=np.uint64, count=len(words))
    elif unit == "char":
        text = _SPACES.sub(" ", text).strip()
        if not text:
            return np.zeros(0, dtype=np.uint64)
        units = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    else:
        raise ConfigError(f"shingle unit must be one of {', '.join(SHINGLE_UNITS)}, got {unit!r}")
    return np.unique(_combine(units, size))


@dataclass(frozen=True)
class Permutations:
    """``num_perm`` universal hash functions h_i(x) = (a_i x + b_i) mod p, truncated to 32 bits."""

    num_perm: int = 128
    seed: int = 1
    a: np.ndarray = field(init=False, repr=False, compare=False)
    b: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.num_perm < 2:
            raise ConfigError(f"the number of permutations must be at least 2, got {self.num_perm}")
        rng = np.random.default_rng(self.seed)
        # a, b < 2^32 and x < 2^32 keep a x + b below 2^64: exact in uint64, then reduced mod p.
        object.__setattr__(self, "a", rng.integers(1, 1 << 32, size=(self.num_perm, 1), dtype=np.uint64))
        object.__setattr__(self, "b", rng.integers(0, 1 << 32, size=(self.num_perm, 1), dtype=np.uint64))


def minhash(hashes: np.ndarray, perms: Permutations, block: int = 4096) -> np.ndarray:
    """The MinHash signature of a set of 32-bit hashes: for each permutation the smallest image (uint32).

    An empty set gets the all-ones signature (it matches only other empty sets, which callers drop first).
    ``block`` bounds the (num_perm, block) temporary for documents with many shingles.
    """
    signature = np.full(perms.num_perm, MAX_HASH, dtype=np.uint64)
    for start in range(0, len(hashes), block):
        x = hashes[start:start + block][None, :]
        images = ((perms.a * x + perms.b) % MERSENNE_PRIME) & MAX_HASH  # (num_perm, n)
        np.minimum(signature, images.min(axis=1), out=signature)
    return signature.astype(np.uint32)


def estimate_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    """The fraction of equal minima: an unbiased estimate of the Jaccard similarity of the two sets."""
    if sig_a.shape != sig_b.shape:
        raise ConfigError(f"signatures of different lengths ({len(sig_a)} and {len(sig_b)}) cannot be compared")
    return float(np.mean(sig_a == sig_b))


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """The exact Jaccard similarity |A & B| / |A | B| of two sets of hashes (1.0 for two empty sets)."""
    union = len(np.union1d(a, b))
    return 1.0 if union == 0 else len(np.intersect1d(a, b)) / union


# --------------------------------------------------------------------------------------------------
def candidate_probability(similarity, bands: int, rows: int):
    """P(two documents of Jaccard ``similarity`` share at least one band) = 1 - (1 - s^r)^b."""
    return 1.0 - (1.0 - np.asarray(similarity, dtype=np.float64) ** rows) ** bands


def lsh_parameters(threshold: float, num_perm: int, false_positive_weight: float = 0.5,
                   false_negative_weight: float = 0.5) -> tuple[int, int]:
    """(bands, rows) with bands * rows <= num_perm whose S-curve best separates pairs at ``threshold``.

    Minimises w_fp * (area under the curve below the threshold: pairs that are not near-duplicates but become
    candidates) + w_fn * (area above the curve beyond the threshold: near-duplicates that are missed).
    """
    if not 0.0 < threshold < 1.0:
        raise ConfigError(f"the near-duplicate threshold must be between 0 and 1, got {threshold}")
    if num_perm < 2:
        raise ConfigError(f"the number of permutations must be at least 2, got {num_perm}")
    shapes = np.array([(b, r) for b in range(1, num_perm + 1) for r in range(1, num_perm // b + 1)])
    b, r = shapes[:, :1], shapes[:, 1:]  # one row per candidate shape
    below = np.linspace(0.0, threshold, 201)
    above = np.linspace(threshold, 1.0, 201)
    fp = np.trapezoid(1.0 - (1.0 - below ** r) ** b, below, axis=1)
    fn = np.trapezoid((1.0 - above ** r) ** b, above, axis=1)
    best = int(np.argmin(false_positive_weight * fp + false_negative_weight * fn))  # the first of equals
    return int(shapes[best, 0]), int(shapes[best, 1])


class LSHIndex:
    """Banded LSH over MinHash signatures: one dict per band from the band's 64-bit hash to a document id.

    Memory grows with the documents inserted, never with their length: ``bands`` dict entries per document
    (a 64-bit key and a shared id, about 100 bytes each in CPython), see ``approximate_bytes``.
    """

    def __init__(self, bands: int, rows: int, seed: int = 7):
        if bands < 1 or rows < 1:
            raise ConfigError(f"LSH needs at least one band of one row, got {bands} bands of {rows} rows")
        self.bands, self.rows = bands, rows
        self.tables: list[dict[int, int]] = [{} for _ in range(bands)]
        self.multipliers = np.random.default_rng(seed).integers(1, 1 << 63, size=rows, dtype=np.uint64) | np.uint64(1)
        self.size = 0

    def band_keys(self, signature: np.ndarray) -> list[int]:
        """One 64-bit key per band: a polynomial hash of its r minima (wrapping uint64 arithmetic)."""
        need = self.bands * self.rows
        if len(signature) < need:
            raise ConfigError(f"a signature of {len(signature)} minima cannot fill {self.bands} bands of "
                              f"{self.rows} rows: use at least {need} permutations")
        rows = signature[:need].astype(np.uint64).reshape(self.bands, self.rows)
        with np.errstate(over="ignore"):
            return (rows * self.multipliers).sum(axis=1, dtype=np.uint64).tolist()

    def query(self, signature: np.ndarray, keys: list[int] | None = None) -> int | None:
        """The id of the first inserted document that shares a band with ``signature``, or None."""
        for table, key in zip(self.tables, keys if keys is not None else self.band_keys(signature)):
            found = table.get(key)
            if found is not None:
                return found
        return None

    def candidates(self, signature: np.ndarray, keys: list[int] | None = None) -> list[int]:
        """The distinct ids of the inserted documents that share a band with ``signature``, in band order."""
        found = (table.get(key) for table, key in zip(self.tables, keys if keys is not None else
                                                        self.band_keys(signature)))
        return list(dict.fromkeys(i for i in found if i is not None))

    def insert(self, signature: np.ndarray, doc_id: int, keys: list[int] | None = None) -> None:
        """Index ``doc_id`` under each of its band keys (an earlier document keeps a shared bucket)."""
        for table, key in zip(self.tables, keys if keys is not None else self.band_keys(signature)):
            table.setdefault(key, doc_id)
        self.size += 1

    def approximate_bytes(self) -> int:
        """A rough size of the index: ~100 bytes per band entry (a dict slot, a 64-bit int key)."""
        return 100 * sum(len(t) for t in self.tables)


class SignatureStore:
    """The MinHash signatures of the kept documents by kept number, in one growing uint32 array (``clean --verify``).

    Kept documents without shingles (no word in them) get no signature and are never a candidate.
    """

    def __init__(self, num_perm: int):
        self.data = np.zeros((1024, num_perm), dtype=np.uint32)

    def append(self, kept_id: int, signature: np.ndarray) -> None:
        if kept_id >= len(self.data):
            grown = np.zeros((max(2 * len(self.data), kept_id + 1), self.data.shape[1]), dtype=np.uint32)
            grown[:len(self.data)] = self.data
            self.data = grown
        self.data[kept_id] = signature

    def __getitem__(self, kept_id: int) -> np.ndarray:
        return self.data[kept_id]

    def nbytes(self) -> int:
        return self.data.nbytes
