"""The pieces of byte-level BPE below the `Tokenizer` class: pre-tokenizer regexes, GPT-2's byte alphabet,
and the merge loop. `scratchlm.tokenizer` assembles them; a BPE trainer needs the same pieces.

Pre-tokenization follows HF `tokenizers`, which runs these regexes with Oniguruma; we run them with the
`regex` package. The two agree on every character assigned in Unicode 16.0 (checked by a scan of all code
points in a dozen contexts). Characters new in later Unicode versions may be letters to one engine and
unassigned to the other, as with any two regex engines built on different Unicode tables.
"""

from __future__ import annotations

import heapq

import regex

# Pre-tokenizer patterns, applied with `regex.findall`. Every character falls in one of the alternatives
# (\s, \p{L}, \p{N} or the rest), so the matches cover the text exactly, as HF's "Isolated" split does.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# cl100k_base, as published in tiktoken (openai_public.py).
GPT4_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)
# SmolLM2 runs HF's Digits(individual_digits=True) and then GPT-2's regex on each piece Digits produced. The
# same split in one pass: every number character is its own pre-token (so " ?\p{N}+" can never match more than
# one), and a whitespace run may end before a digit, because in the two-pass form a digit begins a new piece,
# which "(?!\S)" sees as the end of the text. tests/test_tokenizer.py checks this against the two-pass form.
SMOLLM_PATTERN = r"""\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""

PRETOKENIZER_PATTERNS = {"gpt2": GPT2_PATTERN, "smollm": SMOLLM_PATTERN, "gpt4": GPT4_PATTERN}
PRETOKENIZER_REGEXES = {name: regex.compile(p) for name, p in PRETOKENIZER_PATTERNS.items()}


def pretokenize(text: str, pretokenizer: str) -> list[str]:
    """Split text into the pieces BPE works on, e.g. "Hello world" -> ["Hello", " world"]."""
    return PRETOKENIZER_REGEXES[pretokenizer].findall(text)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> character table: printable bytes map to themselves, the rest to chr(256 + n).

    Byte 0x20 (space) becomes "Ġ" and 0x0A (newline) becomes "Ċ", which is why vocabularies contain "Ġthe".
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return table


BYTE_TO_UNICODE = bytes_to_unicode()
UNICODE_TO_BYTE = {c: b for b, c in BYTE_TO_UNICODE.items()}
# str.translate tables. Bytes decoded as latin-1 are one character per byte, so these convert between
# bytes and GPT-2's alphabet in C, much faster than a Python loop over the bytes.
_LATIN1_TO_BYTE_LEVEL = str.maketrans({chr(b): c for b, c in BYTE_TO_UNICODE.items()})
_BYTE_LEVEL_TO_LATIN1 = str.maketrans({c: chr(b) for b, c in BYTE_TO_UNICODE.items()})
_BYTE_LEVEL_ALPHABET = frozenset(UNICODE_TO_BYTE)


def to_byte_level(text: str) -> str:
    """Text's UTF-8 bytes in GPT-2's alphabet, one character per byte: " héllo" -> "ĠhÃ©llo"."""
    return text.encode("utf-8").decode("latin-1").translate(_LATIN1_TO_BYTE_LEVEL)


def token_bytes(token: str) -> bytes:
    """The bytes a vocabulary string stands for, as HF's ByteLevel decoder computes them.

    A token made only of GPT-2-alphabet characters maps back byte by byte; any other token stands for its
    own UTF-8 text. (A special token such as "<|im_end|>" is both, and maps to itself either way.)
    """
    if _BYTE_LEVEL_ALPHABET.issuperset(token):
        return token.translate(_BYTE_LEVEL_TO_LATIN1).encode("latin-1")
    return token.encode("utf-8")


def bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """Split a byte-level word into tokens by merging adjacent pairs, lowest merge rank first.

    The textbook loop (find the lowest-ranked adjacent pair, merge it, repeat) costs O(n) per merge, which
    is quadratic on a long word such as 10,000 CJK characters without punctuation. So the candidate pairs
    wait in a heap ordered by (rank, position), leftmost first on ties as in HF tokenizers, and the parts
    form a linked list (`next_`, `prev`); the result is the same.

    Args:
        ranks: merge pair -> rank, a distinct rank per pair (lower merges first).
    """
    parts: list[str | None] = list(word)  # parts[i] becomes None once merged into its left neighbour
    n = len(parts)
    if n < 2:
        return list(word)
    next_ = [*range(1, n), -1]
    prev = list(range(-1, n - 1))
    heap = [(ranks[pair], i) for i, pair in enumerate(zip(parts, parts[1:])) if pair in ranks]
    heapq.heapify(heap)

    def push(i: int) -> None:
        """Queue the pair that starts at part i, if it is a merge."""
        if i != -1 and next_[i] != -1:
            rank = ranks.get((parts[i], parts[next_[i]]))
            if rank is not None:
                heapq.heappush(heap, (rank, i))

    while heap:
        rank, i = heapq.heappop(heap)
        j = next_[i]
        # Skip entries made stale by earlier merges. Parts only grow and each rank names one pair, so the
        # pair at i is unchanged exactly when it still has this rank.
        if parts[i] is None or j == -1 or ranks.get((parts[i], parts[j])) != rank:
            continue
        parts[i] += parts[j]
        parts[j] = None
        next_[i] = next_[j]
        if next_[i] != -1:
            prev[next_[i]] = i
        push(prev[i])
        push(i)
    return [p for p in parts if p is not None]
