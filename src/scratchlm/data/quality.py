"""Quality filters: the Gopher rules (Rae et al. 2021, "Scaling Language Models", appendix A.1.1, table A1).

    rules = QualityRules()                                   # the paper's thresholds
    measures = measure(text)                                 # every statistic the rules read
    failed = first_failed_rule(measures, rules)              # None, or ("min_words", 12.0)

Definitions (each can be checked by hand on a small text):
- a *token* is a run of non-space characters; a *word* is a token with the punctuation and symbols at its two
  ends stripped, if anything is left ("end." -> "end", "--" -> no word);
- *lines* are the non-blank lines; *paragraphs* the non-blank blocks between blank lines (each stripped);
- character fractions of lines and paragraphs divide by the characters of the whole text; n-gram character
  fractions count word characters only (no spaces) and divide by the characters of all words.

The rules and the paper's thresholds (a document that crosses any one is removed):
- words: 50 <= count <= 100,000; mean word length between 3 and 10 characters;
- symbols: "#" per word <= 0.1; ellipses ("..." or "…") per word <= 0.1;
- lines: <= 90% start with a bullet; <= 30% end with an ellipsis;
- >= 80% of words hold an alphabetic character; >= 2 of the stop words {the, be, to, of, and, that, have,
  with} appear (Gopher's English list; ``--stop-words`` gives another language's);
- repetition: duplicate lines <= 30% of lines and <= 20% of characters; the same for paragraphs; the most
  frequent 2-, 3-, 4-gram covers <= 20%, 18%, 16% of word characters; words inside n-grams that occur more
  than once cover <= 15%, 14%, 13%, 12%, 11%, 10% of word characters for n = 5 ... 10.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import regex

from scratchlm.errors import ConfigError

GOPHER_STOP_WORDS = ("the", "be", "to", "of", "and", "that", "have", "with")
BULLETS = ("•", "●", "○", "◦", "▪", "▫", "■", "□", "‣", "⁃", "∙", "·", "-", "*", "–", "—")
ELLIPSES = ("...", "…")
TOP_NGRAMS = (2, 3, 4)
DUP_NGRAMS = (5, 6, 7, 8, 9, 10)
_PARAGRAPH_BREAK = regex.compile(r"\n[ \t\r\f\v]*\n")


# From the first to the last character of a token that is neither punctuation, symbol nor space: one match per
# whitespace token that holds such a character ("(end)." -> "end", "a--b" -> "a--b", "--" -> nothing).
_WORD = regex.compile(r"[^\s\p{P}\p{S}](?:\S*[^\s\p{P}\p{S}])?")
_LETTER = regex.compile(r"\p{L}")


def words_of(text: str) -> list[str]:
    """The words of ``text``: whitespace tokens with leading and trailing punctuation/symbols removed."""
    return _WORD.findall(text)


@dataclass(frozen=True)
class QualityRules:
    """Thresholds of the Gopher rules; ``None`` turns a rule off. Defaults: the paper's values."""

    min_words: float | None = 50
    max_words: float | None = 100_000
    min_mean_word_length: float | None = 3
    max_mean_word_length: float | None = 10
    max_hash_ratio: float | None = 0.1
    max_ellipsis_ratio: float | None = 0.1
    max_bullet_lines: float | None = 0.9
    max_ellipsis_lines: float | None = 0.3
    min_alpha_words: float | None = 0.8
    min_stop_words: float | None = 2
    max_dup_lines: float | None = 0.3
    max_dup_paragraphs: float | None = 0.3
    max_dup_line_chars: float | None = 0.2
    max_dup_paragraph_chars: float | None = 0.2
    max_top_2gram: float | None = 0.20
    max_top_3gram: float | None = 0.18
    max_top_4gram: float | None = 0.16
    max_dup_5gram: float | None = 0.15
    max_dup_6gram: float | None = 0.14
    max_dup_7gram: float | None = 0.13
    max_dup_8gram: float | None = 0.12
    max_dup_9gram: float | None = 0.11
    max_dup_10gram: float | None = 0.10
    stop_words: tuple[str, ...] = GOPHER_STOP_WORDS

    def __post_init__(self):
        for name in rule_names():
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, float)) or value < 0):
                raise ConfigError(f"quality rule {name} must be a number >= 0 or off, got {value!r}")
        if self.min_stop_words and not self.stop_words:
            raise ConfigError("min_stop_words needs a stop-word list: give --stop-words or turn the rule off "
                              "with --rule min_stop_words=off")
        object.__setattr__(self, "stop_words", tuple(w.casefold() for w in self.stop_words))

    def replace(self, **changes) -> QualityRules:
        return dataclasses.replace(self, **changes)

    def active(self) -> dict[str, float]:
        """The rules that are on, in the order they are checked."""
        return {name: getattr(self, name) for name in rule_names() if getattr(self, name) is not None}


def rule_names() -> list[str]:
    """Every rule's name, in the order the rules are checked (cheap word rules first)."""
    return [f.name for f in dataclasses.fields(QualityRules) if f.name != "stop_words"]


DESCRIPTIONS = {
    "min_words": "it has fewer words",
    "max_words": "it has more words",
    "min_mean_word_length": "its mean word length (characters) is lower",
    "max_mean_word_length": "its mean word length (characters) is higher",
    "max_hash_ratio": "'#' per word is higher",
    "max_ellipsis_ratio": "ellipses ('...' or '…') per word are higher",
    "max_bullet_lines": "a larger share of its lines starts with a bullet",
    "max_ellipsis_lines": "a larger share of its lines ends with an ellipsis",
    "min_alpha_words": "a smaller share of its words holds a letter",
    "min_stop_words": "fewer of the stop words appear in it",
    "max_dup_lines": "a larger share of its lines repeats an earlier line",
    "max_dup_paragraphs": "a larger share of its paragraphs repeats an earlier one",
    "max_dup_line_chars": "repeated lines hold a larger share of its characters",
    "max_dup_paragraph_chars": "repeated paragraphs hold a larger share of its characters",
    **{f"max_top_{n}gram": f"its most frequent {n}-gram covers a larger share of word characters" for n in TOP_NGRAMS},
    **{f"max_dup_{n}gram": f"{n}-grams seen more than once cover a larger share of word characters"
       for n in DUP_NGRAMS},
}


# Language-specific rules: the stop words are English; typical word lengths differ between languages.
LANGUAGE_SPECIFIC = ("min_stop_words", "min_mean_word_length", "max_mean_word_length")


def language_agnostic(rules: QualityRules) -> QualityRules:
    """``rules`` without the rules that assume English (stop words, mean word length)."""
    return rules.replace(**{name: None for name in LANGUAGE_SPECIFIC})


def parse_rule(spec: str) -> tuple[str, float | None]:
    """``NAME=VALUE`` (VALUE a number, or ``off``) as ``(name, value)``; a ConfigError names the known rules."""
    name, sep, value = spec.partition("=")
    name = name.strip().replace("-", "_")
    if not sep or name not in rule_names():
        raise ConfigError(f"--rule {spec!r}: give NAME=VALUE or NAME=off with NAME one of "
                          f"{', '.join(rule_names())} (see `scratchlm data rules`)")
    value = value.strip()
    if value.lower() in ("off", "none"):
        return name, None
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(f"--rule {spec!r}: {value!r} is not a number; give a number or off") from None
    return name, number


# --------------------------------------------------------------------------------------------------
def _duplicates(items: list[str]) -> tuple[int, int]:
    """(number of items that repeat an earlier one, their characters)."""
    seen: set[str] = set()
    count = chars = 0
    for item in items:
        if item in seen:
            count += 1
            chars += len(item)
        else:
            seen.add(item)
    return count, chars


def _ngram_keys(word_ids: np.ndarray, largest: int) -> dict[int, np.ndarray]:
    """For n = 1..largest, a 64-bit key per n-gram position (a polynomial hash: key_n = key_(n-1) * M + id).

    Equal n-grams get equal keys; distinct ones collide with probability ~2^-64 per pair.
    """
    keys = {1: word_ids}
    with np.errstate(over="ignore"):
        for n in range(2, largest + 1):
            keys[n] = keys[n - 1][:-1] * np.uint64(0x100000001B3) + word_ids[n - 1:]
    return keys


def ngram_fractions(words: list[str]) -> dict[str, float]:
    """Top n-gram (n = 2..4) and duplicate n-gram (n = 5..10) character fractions of ``words``."""
    out = {f"top_{n}gram": 0.0 for n in TOP_NGRAMS} | {f"dup_{n}gram": 0.0 for n in DUP_NGRAMS}
    lengths = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
    total = int(lengths.sum())
    if total == 0:
        return out
    # Python's string hash as the word id: equal words, equal ids (within this process, which is all we need).
    word_ids = np.fromiter(map(hash, words), dtype=np.int64, count=len(words)).view(np.uint64)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    keys = _ngram_keys(word_ids, min(len(words), max(DUP_NGRAMS)))
    for n in TOP_NGRAMS + DUP_NGRAMS:
        if len(words) < n:
            continue
        _, ids, counts = np.unique(keys[n], return_inverse=True, return_counts=True)
        if n in TOP_NGRAMS:
            top = int(counts.max())
            if top > 1:  # an n-gram seen once is no repetition
                # Among equally frequent n-grams the longest counts: the result does not depend on hash order.
                at = np.flatnonzero(counts[ids] == top)
                chars = int((starts[at + n] - starts[at]).max())
                out[f"top_{n}gram"] = top * chars / total
        else:
            repeated = np.flatnonzero(counts[ids] > 1)  # positions where a repeated n-gram starts
            if len(repeated):
                covered = np.zeros(len(words) + 1, dtype=np.int64)  # words i..i+n-1 covered: a difference array
                np.add.at(covered, repeated, 1)
                np.add.at(covered, repeated + n, -1)
                mask = np.cumsum(covered)[:len(words)] > 0
                out[f"dup_{n}gram"] = int(lengths[mask].sum()) / total
    return out


def measure(text: str, stop_words: tuple[str, ...] = GOPHER_STOP_WORDS, ngrams: bool = True,
            words: list[str] | None = None) -> dict[str, float]:
    """Every statistic the rules read, measured on ``text`` (see the module docstring for the definitions).

    ``ngrams=False`` leaves out the n-gram fractions (the costliest part); ``words``: ``words_of(text)`` if
    already split.
    """
    words = words_of(text) if words is None else words
    n_words = len(words)
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    paragraphs = [p.strip() for p in _PARAGRAPH_BREAK.split(text) if p.strip()]
    chars = max(1, len(text))
    per_word = max(1, n_words)
    dup_lines, dup_line_chars = _duplicates(lines)
    dup_paragraphs, dup_paragraph_chars = _duplicates(paragraphs)
    present = set(map(str.casefold, words))
    out = {
        "words": float(n_words),
        "mean_word_length": sum(map(len, words)) / per_word,
        "hash_ratio": text.count("#") / per_word,
        "ellipsis_ratio": sum(text.count(e) for e in ELLIPSES) / per_word,
        "bullet_lines": sum(line.startswith(BULLETS) for line in lines) / max(1, len(lines)),
        "ellipsis_lines": sum(line.endswith(ELLIPSES) for line in lines) / max(1, len(lines)),
        "alpha_words": sum(1 for w in words if w.isalpha() or _LETTER.search(w)) / per_word,
        "stop_words": float(sum(w in present for w in stop_words)),
        "dup_lines": dup_lines / max(1, len(lines)),
        "dup_paragraphs": dup_paragraphs / max(1, len(paragraphs)),
        "dup_line_chars": dup_line_chars / chars,
        "dup_paragraph_chars": dup_paragraph_chars / chars,
    }
    return out | ngram_fractions(words) if ngrams else out


def measured_name(rule: str) -> str:
    """The statistic a rule reads: ``min_words`` -> ``words``, ``max_top_2gram`` -> ``top_2gram``."""
    return rule.split("_", 1)[1]


def first_failed_rule(measures: dict[str, float], limits: dict[str, float]) -> tuple[str, float] | None:
    """``(rule, measured value)`` of the first rule in ``limits`` (name -> threshold) that the measures break."""
    for name, limit in limits.items():
        value = measures[measured_name(name)]
        if name.startswith("min_") and value < limit or name.startswith("max_") and value > limit:
            return name, value
    return None


def check(text: str, rules: QualityRules) -> tuple[str, float] | None:
    """The first Gopher rule ``text`` breaks, as ``(rule, value)``, or None.

    The n-gram statistics are measured only for documents that pass every other rule.
    """
    active = rules.active()
    plain = {name: limit for name, limit in active.items() if not name.endswith("gram")}
    words = words_of(text)
    measures = measure(text, rules.stop_words, ngrams=False, words=words)
    failed = first_failed_rule(measures, plain)
    if failed is None and len(plain) < len(active):
        failed = first_failed_rule(measures | ngram_fractions(words), active)
    return failed
