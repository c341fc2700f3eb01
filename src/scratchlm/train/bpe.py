"""Training a byte-level BPE tokenizer (Sennrich et al. 2016; GPT-2's byte-level variant, Radford et al. 2019).

The algorithm fits in two sentences: count how often each pair of adjacent tokens occurs in the training
text, then merge the most frequent pair into a new token everywhere; repeat until the vocabulary is full.
minbpe writes exactly that (recount every pair after every merge), which costs a pass over the whole
corpus per merge. Three data structures make the same algorithm fast without changing its result:

1. **Deduplicated words.** Text is pre-tokenized first (GPT-4's regex, as in `scratchlm.tokenizer`), merges
   never cross a pre-token, and natural text repeats its words: so we keep each distinct word once with its
   frequency (the 1 MB Shakespeare corpus holds 248,290 words but only 15,978 distinct ones).
2. **Incremental pair counts.** Merging (a, b) changes pair counts only in the words that contain (a, b).
   An index `where[pair]` lists those words; only they are rewritten, and their old pairs are subtracted
   from the counts and their new pairs added.
3. **A heap of pair counts** finds the most frequent pair without scanning every pair. A merge of (a, b)
   into c only lowers the counts of existing pairs (their occurrences next to a or b are gone) and creates
   pairs that contain c. So new pairs are pushed once, and a lowered count is fixed lazily: an entry that
   reaches the top with more than its pair's true count is pushed back with the true count. No entry ever
   understates its pair's count, so the first entry that agrees with its true count is the maximum.

Tie-breaking (documented because it decides the result): among pairs with the same count, the pair with
the smaller left id wins, then the smaller right id. Ids are bytes 0..255 for the single bytes and then
256, 257, ... in order of creation, so ties go to older tokens; this is the order of the heap
entries ``(-count, left, right)``. HF `tokenizers` breaks ties the same way on its own ids, which number
the initial alphabet differently, so the two can pick different merges on ties (compression is compared
in benchmarks/tokenizer.py).

Vocabulary layout: ids 0..255 are the 256 bytes (in byte order), then one id per merge in the order the
merges were learned, then the special tokens. Special tokens in the training text are cut out before
counting, exactly as `Tokenizer.encode` cuts them out, so no merge ever reaches into "<|endoftext|>".
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Iterable

import regex

from scratchlm.bpe_pretokenize import BYTE_TO_UNICODE, PRETOKENIZER_REGEXES
from scratchlm.errors import ConfigError, DataError
from scratchlm.tokenizer import Tokenizer

PRETOKENIZER = "gpt4"
N_BYTES = 256

Pair = tuple[int, int]


def count_words(texts: Iterable[str], special_tokens: list[str]) -> Counter[str]:
    """How often each pre-token ("word") occurs in ``texts``, with special token texts cut out first."""
    split = PRETOKENIZER_REGEXES[PRETOKENIZER]
    specials = (regex.compile("|".join(regex.escape(t) for t in sorted(special_tokens, key=len, reverse=True)))
                if special_tokens else None)
    counts: Counter[str] = Counter()
    for text in texts:
        for piece in specials.split(text) if specials else (text,):
            counts.update(split.findall(piece))
    return counts


def merge_word(word: list[int], pair: Pair, new_id: int) -> list[int]:
    """Replace every occurrence of ``pair`` in ``word``, left to right, by ``new_id``."""
    a, b = pair
    out = []
    i, n = 0, len(word)
    while i < n:
        if word[i] == a and i + 1 < n and word[i + 1] == b:
            out.append(new_id)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    special_tokens: list[str] = ["<|endoftext|>"],  # noqa: B006 (never mutated)
    progress: bool = False,
) -> Tokenizer:
    """Train a byte-level BPE tokenizer with GPT-4's pre-tokenizer on ``texts``.

    Args:
        texts: the training text, any iterable of strings (each is read once).
        vocab_size: the size of the result, the 256 bytes and the special tokens included. When the text
            runs out of pairs to merge first, the vocabulary stays smaller (as HF's BpeTrainer does).
        special_tokens: texts such as "<|endoftext|>", given the last ids in this order.
        progress: show a progress bar over the merges.
    """
    specials = list(special_tokens)
    if len(set(specials)) != len(specials):
        raise ConfigError(f"special tokens are listed twice: {specials}")
    if "" in specials:
        raise ConfigError("a special token cannot be the empty string")
    smallest = N_BYTES + len(specials)
    if vocab_size < smallest:
        raise ConfigError(f"vocabulary size {vocab_size} is too small: a byte-level BPE needs the {N_BYTES} bytes "
                          f"plus {len(specials)} special token(s), so at least {smallest}")

    word_counts = count_words(texts, specials)
    if not word_counts:
        raise DataError("cannot train a tokenizer on empty text: give a corpus with some text")

    # Each distinct word as a list of token ids (its UTF-8 bytes to begin with), with its frequency.
    words = [list(w.encode("utf-8")) for w in word_counts]
    freqs = list(word_counts.values())
    counts: dict[Pair, int] = {}  # pair -> occurrences in the corpus
    where: dict[Pair, set[int]] = {}  # pair -> indices of the words that (may) contain it
    for index, (word, freq) in enumerate(zip(words, freqs)):
        for pair in zip(word, word[1:]):
            counts[pair] = counts.get(pair, 0) + freq
            where.setdefault(pair, set()).add(index)
    heap = [(-count, a, b) for (a, b), count in counts.items()]
    heapq.heapify(heap)

    id_to_bytes = [bytes([b]) for b in range(N_BYTES)]
    merges: list[Pair] = []
    n_tokens = vocab_size - len(specials)

    from tqdm.auto import tqdm

    bar = tqdm(total=n_tokens - N_BYTES, desc="BPE merges", unit="merge", disable=not progress)
    while len(id_to_bytes) < n_tokens and heap:
        neg_count, a, b = heapq.heappop(heap)
        pair = (a, b)
        count = counts.get(pair, 0)
        if count != -neg_count:
            # Stale: the pair lost occurrences since this entry was pushed.
            if count > 0:
                heapq.heappush(heap, (-count, a, b))
            continue

        # The new token. Its bytes are always new: a byte string that BPE has made a token stays one token
        # wherever it stands between two token boundaries, so no later pair can spell it again.
        new_id = len(id_to_bytes)
        id_to_bytes.append(id_to_bytes[a] + id_to_bytes[b])
        merges.append(pair)
        bar.update()

        grown: set[Pair] = set()
        for index in where.pop(pair):
            old = words[index]
            new = merge_word(old, pair, new_id)
            if len(new) == len(old):
                continue  # an earlier merge already took the pair apart in this word
            freq = freqs[index]
            for p in zip(old, old[1:]):
                counts[p] -= freq
            for p in zip(new, new[1:]):
                counts[p] = counts.get(p, 0) + freq
                if new_id in p:
                    where.setdefault(p, set()).add(index)
                    grown.add(p)
            words[index] = new
        # Pairs with the new token are new; every other pair only lost occurrences.
        for p in grown:
            heapq.heappush(heap, (-counts[p], *p))
        counts.pop(pair, None)
    bar.close()
    return _to_tokenizer(id_to_bytes, merges, specials)


def _to_tokenizer(id_to_bytes: list[bytes], merges: list[Pair], specials: list[str]) -> Tokenizer:
    """Assemble the trained ids into a `Tokenizer` (GPT-2's byte alphabet for the token strings)."""

    def text(i: int) -> str:
        return "".join(BYTE_TO_UNICODE[b] for b in id_to_bytes[i])

    vocab = {text(i): i for i in range(len(id_to_bytes))}
    special_ids = {token: len(id_to_bytes) + k for k, token in enumerate(specials)}
    return Tokenizer(vocab, [(text(a), text(b)) for a, b in merges], special_ids, pretokenizer=PRETOKENIZER,
                     eos_token=specials[0] if specials else None)
