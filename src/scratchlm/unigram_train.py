"""Training a Unigram language-model tokenizer (Kudo 2018), following sentencepiece's trainer.

BPE grows a vocabulary from bytes upward; the Unigram trainer starts from far too many pieces and prunes.

1. **Normalise and count words.** The text is normalised and split into words that start with ``▁`` (the
   pipeline the tokenizer itself runs, ``scratchlm.unigram.HFNormalizer``); each distinct word is kept once
   with its count. Characters outside the most frequent ``character_coverage`` share become unknown.
2. **Seed vocabulary.** Every substring of the distinct sentences (up to ``max_piece_length`` characters)
   that occurs at least twice and is *right-branching* (followed by two different characters somewhere: the
   internal nodes of a suffix tree, which sentencepiece finds with a suffix array) is a candidate, scored by
   frequency x length; the best ``seed_size`` and every character start, with log-probabilities from those.
   Pieces may not mix scripts (Latin with Han, letters with digits or punctuation) nor hold ``▁`` inside.
3. **EM.** E-step: for each word, the forward-backward algorithm over its lattice of pieces gives each
   piece's expected count. M-step: drop pieces expected less than 0.5 times; the rest get
   ``digamma(count) - digamma(total)`` (sentencepiece's Bayesian variant of the EM update, a sparse prior).
4. **Prune.** For each piece, the best segmentation of the piece without itself is its replacement; the
   loss of removing it is (how often it is used) x (its log-probability minus that of its replacement).
   Keep the 75% with the largest loss (``shrinking_factor``), run EM again, until the vocabulary is within
   10% of the target; then keep the highest-scoring pieces, every required character included.

The result is a ``scratchlm.unigram.Unigram`` with HF tokenizer.json semantics, so ``save`` writes a file
that HF ``tokenizers`` loads and encodes identically. Compression is within 2% of sentencepiece's trainer at
the same vocabulary size (``benchmarks/unigram.py``).
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Iterable

import regex

from scratchlm.errors import ConfigError, DataError
from scratchlm.sentencepiece_model import CONTROL, NORMAL, UNKNOWN
from scratchlm.unigram import UNK_PENALTY, Unigram
from scratchlm.unigram_normalize import SPACE, HFNormalizer

UNK_CHAR = "\u2047"  # "⁇": stands for a character outside the covered set (sentencepiece's kUNKChar)
DEFAULT_SPECIALS = ["<s>", "</s>"]
# Text normalisations a trained tokenizer can use, as HF tokenizers normalizers.
NORMALIZATIONS = {
    # sentencepiece's default: NFKC, any whitespace run becomes one space, no space at the ends
    "nmt_nfkc": {"type": "Sequence", "normalizers": [
        {"type": "NFKC"},
        {"type": "Replace", "pattern": {"Regex": "[ \\t\\n\\r\\f\\v]+"}, "content": " "},
        {"type": "Strip", "strip_left": True, "strip_right": True},
    ]},
    "nfkc": {"type": "NFKC"},
    # nothing changes: newlines and space runs survive (what an LLM's tokenizer wants), with byte fallback
    "identity": None,
}
# Scripts told apart for the "one script per piece" rule; anything else is Common (punctuation, digits,
# symbols, emoji). Hiragana and Katakana count as Han, as in sentencepiece.
SCRIPTS = ["Latin", "Greek", "Cyrillic", "Armenian", "Hebrew", "Arabic", "Syriac", "Thaana", "Devanagari",
           "Bengali", "Gurmukhi", "Gujarati", "Oriya", "Tamil", "Telugu", "Kannada", "Malayalam", "Sinhala",
           "Thai", "Lao", "Tibetan", "Myanmar", "Georgian", "Hangul", "Ethiopic", "Cherokee", "Khmer", "Mongolian",
           "Han", "Hiragana", "Katakana", "Bopomofo", "Inherited"]
_SCRIPT_RES = [(name, regex.compile(rf"\p{{Script={name}}}")) for name in SCRIPTS]


@functools.lru_cache(maxsize=65536)
def script_of(c: str) -> str:
    """The Unicode script of a character, Hiragana/Katakana (and the long-vowel mark) merged into Han."""
    if c == "\u30fc":
        return "Han"
    for name, pattern in _SCRIPT_RES:
        if pattern.match(c):
            return "Han" if name in ("Hiragana", "Katakana") else name
    return "Common"


def is_valid_piece(piece: str, max_length: int) -> bool:
    """sentencepiece's rule for pieces: not too long, ``▁`` only at the start, one script throughout."""
    if not piece or len(piece) > max_length or UNK_CHAR in piece or "\0" in piece or " " in piece:
        return False
    previous = None
    for pos, c in enumerate(piece):
        if c == SPACE:
            if pos > 0:
                return False
            continue
        script = script_of(c)
        if script == "Inherited":  # combining marks take the script of what they combine with
            script = previous or script
        if previous is not None and script != previous:
            return False
        previous = script
    return True


def _logaddexp(a: float, b: float) -> float:
    if a < b:
        a, b = b, a
    return a + math.log1p(math.exp(b - a)) if b > -math.inf else a


def digamma(x: float) -> float:
    """The digamma function by recurrence and its asymptotic series (as in sentencepiece's trainer)."""
    result = 0.0
    while x < 7:
        result -= 1 / x
        x += 1
    x -= 0.5
    xx = 1.0 / x
    xx2 = xx * xx
    xx4 = xx2 * xx2
    return result + math.log(x) + xx2 / 24 - 7 * xx4 / 960 + 31 * xx4 * xx2 / 8064 - 127 * xx4 * xx4 / 30720


class _Model:
    """The pieces being trained: piece -> index, scores, and the lattice of a word."""

    def __init__(self, pieces: list[tuple[str, float]]):
        self.pieces = pieces
        self.index = {p: i for i, (p, _) in enumerate(pieces)}
        self.max_len = max(len(p) for p, _ in pieces)
        self.min_score = min(s for _, s in pieces)

    def nodes(self, word: str) -> list[list[tuple[int, int, float]]]:
        """For each end position, the (start, piece index, score) of the pieces ending there; index -1 is an
        unknown character (score min_score - 10), added where no one-character piece exists."""
        ends: list[list[tuple[int, int, float]]] = [[] for _ in range(len(word) + 1)]
        index, pieces = self.index, self.pieces
        for start in range(len(word)):
            single = False
            for end in range(start + 1, min(len(word), start + self.max_len) + 1):
                i = index.get(word[start:end])
                if i is not None:
                    ends[end].append((start, i, pieces[i][1]))
                    single = single or end == start + 1
            if not single:
                ends[start + 1].append((start, -1, self.min_score - UNK_PENALTY))
        return ends

    def viterbi(self, word: str, skip_whole: bool = False) -> list[int] | None:
        """Piece indices of the best segmentation (-1 for unknown characters); ``skip_whole`` leaves out the
        piece that is the whole word. None if no segmentation exists."""
        n = len(word)
        ends = self.nodes(word)
        best = [-math.inf] * (n + 1)
        back: list[tuple[int, int]] = [(-1, -1)] * (n + 1)
        best[0] = 0.0
        for end in range(1, n + 1):
            for start, i, score in ends[end]:
                if skip_whole and start == 0 and end == n:
                    continue
                candidate = best[start] + score
                if candidate > best[end]:
                    best[end], back[end] = candidate, (start, i)
        if best[n] == -math.inf:
            return None
        path, end = [], n
        while end > 0:
            start, i = back[end]
            path.append(i)
            end = start
        return path[::-1]

    def expected_counts(self, words: list[str], freqs: list[int]) -> tuple[list[float], float]:
        """E-step: each piece's expected count over the corpus (forward-backward per word), and the
        negative log-likelihood per word."""
        expected = [0.0] * len(self.pieces)
        objective = 0.0
        total = sum(freqs)
        for word, freq in zip(words, freqs):
            n = len(word)
            ends = self.nodes(word)
            alpha = [-math.inf] * (n + 1)
            alpha[0] = 0.0
            for end in range(1, n + 1):
                a = -math.inf
                for start, _, score in ends[end]:
                    a = _logaddexp(a, alpha[start] + score)
                alpha[end] = a
            beta = [-math.inf] * (n + 1)
            beta[n] = 0.0
            for end in range(n, 0, -1):
                b_end = beta[end]
                for start, _, score in ends[end]:
                    beta[start] = _logaddexp(beta[start], score + b_end)
            z = alpha[n]
            for end in range(1, n + 1):
                for start, i, score in ends[end]:
                    if i >= 0:
                        expected[i] += freq * math.exp(alpha[start] + score + beta[end] - z)
            objective -= z * freq / total
        return expected, objective


def _seed_pieces(sentences: Iterable[str], chars: Counter[str], seed_size: int,
                 max_length: int) -> list[tuple[str, float]]:
    """Every character, and the ``seed_size`` best substrings of the normalised sentences that occur at least
    twice and are right-branching, scored by frequency x length, as log-probabilities.

    Right-branching substrings (followed by two different characters somewhere, the end of a sentence
    counting as one) are the internal nodes of the sentences' suffix tree, which sentencepiece enumerates
    with a suffix array; the others are prefixes of a longer substring that is just as frequent. As there,
    each distinct sentence counts once.
    """
    counts: Counter[str] = Counter()
    first_next: dict[str, str] = {}
    branching: set[str] = set()
    for sentence in sentences:
        n = len(sentence)
        for i in range(n):
            for j in range(i + 2, min(n, i + max_length) + 1):
                sub = sentence[i:j]
                if sub[-1] == SPACE or sub[-1] == UNK_CHAR:
                    break  # pieces hold "▁" only at the start, and never the unknown character
                counts[sub] += 1
                following = sentence[j] if j < n else "\0"
                if first_next.setdefault(sub, following) != following:
                    branching.add(sub)
    candidates = [(sub, counts[sub] * len(sub)) for sub in branching
                  if counts[sub] >= 2 and is_valid_piece(sub, max_length)]
    candidates.sort(key=lambda item: (-item[1], item[0]))
    seed = [(c, float(n)) for c, n in sorted(chars.items(), key=lambda item: (-item[1], item[0]))]
    seed += [(sub, float(score)) for sub, score in candidates[:seed_size]]
    log_total = math.log(sum(score for _, score in seed))
    return [(piece, math.log(score) - log_total) for piece, score in seed]


def _prune(model: _Model, words: list[str], freqs: list[int], desired: int, shrinking_factor: float,
           ) -> list[tuple[str, float]]:
    """Keep the pieces whose removal would cost the likelihood most (sentencepiece's PruneSentencePieces)."""
    pieces = model.pieces
    always_keep = [True] * len(pieces)
    alternatives: list[list[int]] = [[] for _ in pieces]
    for i, (piece, _) in enumerate(pieces):
        if len(piece) == 1:
            continue  # a character has no other segmentation: always kept
        best = model.viterbi(piece)
        if best is not None and len(best) >= 2:
            always_keep[i] = False  # its own best segmentation does not use it
        else:
            alternatives[i] = model.viterbi(piece, skip_whole=True) or []
    freq = [0.0] * len(pieces)
    inverted: list[list[int]] = [[] for _ in pieces]
    vsum = float(sum(freqs))
    for w, (word, count) in enumerate(zip(words, freqs)):
        for i in model.viterbi(word) or []:
            if i >= 0:
                freq[i] += count
                inverted[i].append(w)
    total = sum(freq)
    log_total = math.log(total)
    kept: list[tuple[str, float]] = []
    candidates: list[tuple[float, int]] = []
    for i in range(len(pieces)):
        if freq[i] == 0 or not always_keep[i]:
            continue
        if not alternatives[i] or -1 in alternatives[i]:
            kept.append(pieces[i])
            continue
        used = sum(freqs[w] for w in inverted[i]) / vsum
        logprob = math.log(freq[i]) - log_total
        log_total_alt = math.log(total + freq[i] * (len(alternatives[i]) - 1))
        logprob_alt = sum(math.log(freq[a] + freq[i]) - log_total_alt for a in alternatives[i])
        candidates.append((used * (logprob - logprob_alt), i))
    size = max(desired, int(shrinking_factor * len(pieces)))
    candidates.sort(key=lambda item: (-item[0], item[1]))
    for _, i in candidates:
        if len(kept) >= size:
            break
        kept.append(pieces[i])
    return kept


def train_unigram(
    texts: Iterable[str],
    vocab_size: int,
    special_tokens: list[str] | None = None,
    normalization: str = "nmt_nfkc",
    byte_fallback: bool = False,
    character_coverage: float = 0.9995,
    max_piece_length: int = 16,
    seed_size: int = 1_000_000,
    shrinking_factor: float = 0.75,
    sub_iterations: int = 2,
    progress: bool = False,
) -> Unigram:
    """Train a Unigram tokenizer on ``texts`` (sentencepiece's algorithm and defaults).

    Args:
        texts: the training text, any iterable of strings (each is read once).
        vocab_size: the size of the result: ``<unk>`` (id 0), the special tokens, the 256 byte pieces if
            ``byte_fallback``, and the learned pieces.
        special_tokens: texts given the ids after ``<unk>`` (default ``<s>``, ``</s>``); cut out of the
            training text, matched whole when encoding.
        normalization: "nmt_nfkc" (sentencepiece's default: NFKC, whitespace runs to one space), "nfkc", or
            "identity" (text kept as it is, newlines included).
        byte_fallback: add the 256 ``<0x..>`` pieces, so no character is ever unknown (Llama's choice).
        character_coverage: the share of characters (by count) that get pieces; the rarest rest are unknown.
    """
    specials = list(DEFAULT_SPECIALS if special_tokens is None else special_tokens)
    specials = ["<unk>"] + [t for t in specials if t != "<unk>"]
    if len(set(specials)) != len(specials) or "" in specials:
        raise ConfigError(f"special tokens must be distinct and non-empty: {specials}")
    if normalization not in NORMALIZATIONS:
        raise ConfigError(f"unknown normalization {normalization!r}; choose one of {sorted(NORMALIZATIONS)}")
    if not 0 < character_coverage <= 1:
        raise ConfigError(f"character_coverage must be in (0, 1], not {character_coverage}")
    n_reserved = len(specials) + (256 if byte_fallback else 0)
    if vocab_size <= n_reserved:
        raise ConfigError(f"vocabulary size {vocab_size} is too small: {n_reserved} ids are reserved for special "
                          f"tokens{' and the 256 byte pieces' if byte_fallback else ''}; give at least "
                          f"{n_reserved + 1}")

    metaspace = {"type": "Metaspace", "replacement": SPACE, "prepend_scheme": "always", "split": True}
    if byte_fallback:
        decoder = {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": SPACE}, "content": " "}, {"type": "ByteFallback"},
            {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
    else:
        decoder = metaspace
    normalizer = HFNormalizer(NORMALIZATIONS[normalization], metaspace, decoder)

    # 1. sentences, words and characters. sentencepiece reads a line as a sentence; with normalisations that
    # turn newlines into spaces, so do we (the words are the same either way).
    split_specials = regex.compile("|".join(regex.escape(t) for t in sorted(specials, key=len, reverse=True)))
    by_line = normalization != "identity"
    sentences: Counter[str] = Counter()
    for text in texts:
        for k, part in enumerate(split_specials.split(text)):
            for line in part.split("\n") if by_line else (part,):
                sentence = "".join(normalizer.words(line, k == 0))
                if sentence:
                    sentences[sentence] += 1
    words: Counter[str] = Counter()
    for sentence, freq in sentences.items():
        for word in normalizer._split_re.split(sentence):
            if word:
                words[word] += freq
    if not words:
        raise DataError("cannot train a tokenizer on empty text: give a corpus with some text")
    chars: Counter[str] = Counter()
    for word, freq in words.items():
        for c in word:
            chars[c] += freq
    total_chars = sum(chars.values())
    required: dict[str, int] = {}
    covered = 0
    for c, n in sorted(chars.items(), key=lambda item: (-item[1], item[0])):
        if covered / total_chars >= character_coverage:
            break
        covered += n
        required[c] = n
    if len(required) < len(chars):  # rare characters become the unknown character in the training words
        rare = regex.compile("[" + "".join(regex.escape(c) for c in chars if c not in required) + "]")
        merged: Counter[str] = Counter()
        for word, freq in words.items():
            merged[rare.sub(UNK_CHAR, word)] += freq
        words = merged
        sentences = Counter({rare.sub(UNK_CHAR, sentence): 1 for sentence in sentences})
    n_pieces = vocab_size - n_reserved

    # 2. seed, 3./4. EM and pruning
    from tqdm.auto import tqdm

    model = _Model(_seed_pieces(sentences, Counter(required), seed_size, max_piece_length))
    word_list, freq_list = list(words), list(words.values())
    desired = int(vocab_size * 1.1)
    bar = tqdm(total=len(model.pieces), desc="Unigram pruning", unit="piece", disable=not progress)
    while True:
        for _ in range(sub_iterations):
            expected, _objective = model.expected_counts(word_list, freq_list)
            kept = [(p, c) for (p, _), c in zip(model.pieces, expected) if c >= 0.5]
            log_total = digamma(sum(c for _, c in kept))
            model = _Model([(p, digamma(c) - log_total) for p, c in kept])
        if len(model.pieces) <= desired:
            break
        before = len(model.pieces)
        model = _Model(_prune(model, word_list, freq_list, desired, shrinking_factor))
        bar.update(before - len(model.pieces))
    bar.close()

    # 5. the final vocabulary: every required character, then the best-scoring pieces
    scores = dict(model.pieces)
    final: dict[str, float] = {}
    penalty = 0.0
    for c in required:
        if c in scores:
            final[c] = scores[c]
        else:
            final[c] = model.min_score + penalty
            penalty += 0.0001
    for piece, score in sorted(model.pieces, key=lambda item: (-item[1], item[0])):
        if len(final) >= n_pieces:
            break
        final.setdefault(piece, score)
    ordered = sorted(final.items(), key=lambda item: (-item[1], item[0]))[:n_pieces]

    pieces: list[tuple[str, float, int]] = [(t, 0.0, UNKNOWN if t == "<unk>" else CONTROL) for t in specials]
    if byte_fallback:
        pieces += [(f"<0x{b:02X}>", 0.0, NORMAL) for b in range(256)]
    pieces += [(p, s, NORMAL) for p, s in ordered]
    special_ids = {t: i for i, t in enumerate(specials)}
    bos = "<s>" if "<s>" in special_ids else None
    eos = "</s>" if special_tokens is None else (specials[1] if len(specials) > 1 else None)
    return Unigram(pieces, normalizer, byte_fallback=byte_fallback, bos_token=bos, eos_token=eos,
                   special_tokens=special_ids)
