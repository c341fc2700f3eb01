"""The bundled translation task: English number phrases into French, written by rule for 0 to 999,999.

    english(71_080) == "seventy-one thousand eighty"
    french(71_080)  == "soixante et onze mille quatre-vingts"

French numerals are a small language of their own with reordering-free but context-dependent rules, enough to
make a model learn structure rather than a table (traditional spelling, as the Académie française's grammar
gives it, not the 1990 reform that hyphenates everything):

* 17-19 are "dix-sept", "dix-huit", "dix-neuf"; 70-79 count on from 60 ("soixante-dix", "soixante et onze",
  "soixante-douze"); 80-99 are "four twenties" ("quatre-vingts", "quatre-vingt-un", "quatre-vingt-dix-sept");
* "et" joins a one to 20, 30, 40, 50 and 60 ("vingt et un", "soixante et onze") but not to 80 or 90;
* "cent" and "vingt" take a plural s when multiplied and last ("deux cents", "quatre-vingts") but not when a
  number follows, "mille" included ("deux cent trois", "deux cent mille", "quatre-vingt mille");
* one hundred and one thousand are "cent" and "mille", without "un"; "mille" never takes an s.

The held-out split is made by construction, not by sampling: ``split_of(n)`` puts every number in one split by
a checksum of its digits (10% test, 5% validation, 85% training). A number of the test split never occurs in
training, so a model that memorised its training pairs scores nothing there; it has to compose the words.
"""

from __future__ import annotations

import random
import zlib

MAX_NUMBER = 999_999
SPLITS = ("train", "valid", "test")

_EN_UNITS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
             "sixteen seventeen eighteen nineteen").split()
_EN_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_FR_UNITS = ("zéro un deux trois quatre cinq six sept huit neuf dix onze douze treize quatorze quinze seize "
             "dix-sept dix-huit dix-neuf").split()
_FR_TENS = "_ _ vingt trente quarante cinquante soixante".split()


def _check(n: int) -> None:
    if not isinstance(n, int) or not 0 <= n <= MAX_NUMBER:
        raise ValueError(f"the number task covers 0 to {MAX_NUMBER:,}, got {n!r}")


def english(n: int) -> str:
    """``n`` in American English words: "three hundred forty-two thousand one hundred six"."""
    _check(n)
    if n == 0:
        return "zero"

    def below_100(m: int) -> str:
        if m < 20:
            return _EN_UNITS[m]
        return _EN_TENS[m // 10] + (f"-{_EN_UNITS[m % 10]}" if m % 10 else "")

    def below_1000(m: int) -> str:
        hundreds, rest = divmod(m, 100)
        words = [f"{_EN_UNITS[hundreds]} hundred"] if hundreds else []
        return " ".join(words + ([below_100(rest)] if rest else []))

    thousands, rest = divmod(n, 1000)
    words = [f"{below_1000(thousands)} thousand"] if thousands else []
    return " ".join(words + ([below_1000(rest)] if rest else []))


def _fr_below_100(m: int, last: bool) -> str:
    """1-99 in French; ``last``: nothing follows (so "quatre-vingts" keeps its s)."""
    if m < 20:
        return _FR_UNITS[m]
    tens, unit = divmod(m, 10)
    if tens in (7, 9):  # 70-79 = 60 + 10..19, 90-99 = 80 + 10..19
        base = "soixante" if tens == 7 else "quatre-vingt"
        joiner = " et " if m == 71 else "-"
        return base + joiner + _FR_UNITS[10 + unit]
    if tens == 8:
        return ("quatre-vingts" if last else "quatre-vingt") if unit == 0 else f"quatre-vingt-{_FR_UNITS[unit]}"
    if unit == 0:
        return _FR_TENS[tens]
    return _FR_TENS[tens] + (" et un" if unit == 1 else f"-{_FR_UNITS[unit]}")


def _fr_below_1000(m: int, last: bool) -> str:
    hundreds, rest = divmod(m, 100)
    words = []
    if hundreds:
        word = "cent" if hundreds == 1 else f"{_FR_UNITS[hundreds]} cent"
        words.append(word + ("s" if hundreds > 1 and rest == 0 and last else ""))
    if rest:
        words.append(_fr_below_100(rest, last))
    return " ".join(words)


def french(n: int) -> str:
    """``n`` in French words (traditional spelling): "trois cent quarante-deux mille cent six"."""
    _check(n)
    if n == 0:
        return "zéro"
    thousands, rest = divmod(n, 1000)
    words = []
    if thousands:
        words.append("mille" if thousands == 1 else f"{_fr_below_1000(thousands, last=False)} mille")
    if rest:
        words.append(_fr_below_1000(rest, last=True))
    return " ".join(words)


def split_of(n: int) -> str:
    """The split that number ``n`` belongs to, for good: "test" (10%), "valid" (5%) or "train" (85%)."""
    bucket = zlib.crc32(str(n).encode("ascii")) % 100
    return "test" if bucket < 10 else "valid" if bucket < 15 else "train"


def sample_numbers(split: str, count: int, seed: int = 0, max_digits: int = 6) -> list[int]:
    """``count`` distinct numbers of one split, their digit count drawn uniformly from 1..``max_digits`` (so short
    numbers are as common as long ones, as far as the split holds enough of them)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = random.Random(f"{seed}-{split}")
    chosen: dict[int, None] = {}  # insertion-ordered set: the same seed gives the same list
    attempts = 0
    while len(chosen) < count and attempts < 100 * count:
        attempts += 1
        digits = rng.randint(1, max_digits)
        n = rng.randrange(10 ** (digits - 1) if digits > 1 else 0, 10 ** digits)
        if split_of(n) == split:
            chosen.setdefault(n)
    return list(chosen)


def number_pairs(split: str, count: int, seed: int = 0) -> list[tuple[str, str]]:
    """(English, French) pairs of ``count`` distinct numbers of ``split``."""
    return [(english(n), french(n)) for n in sample_numbers(split, count, seed)]


# The bundled task's sizes: enough training pairs that the rules, not the pairs, are what fits.
DEFAULT_SIZES = {"train": 40_000, "valid": 500, "test": 1_000}


def default_task(seed: int = 0, sizes: dict[str, int] | None = None) -> dict[str, list[tuple[str, str]]]:
    """The bundled English-to-French number task: {"train": pairs, "valid": pairs, "test": pairs}."""
    sizes = {**DEFAULT_SIZES, **(sizes or {})}
    return {split: number_pairs(split, sizes[split], seed) for split in SPLITS}
