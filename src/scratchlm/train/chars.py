"""A character-level tokenizer (the classic nanoGPT demo: one token per character), as a byte-level BPE.

A character tokenizer maps each distinct character of the training text to an id. We express it as a
``Tokenizer`` so that it saves to (and loads from) the same HF ``tokenizer.json`` as every other model:

- each ASCII character is one byte, hence one byte-level token, with no merges at all;
- a character of several UTF-8 bytes gets merges that glue its bytes back together, lead byte first
  ("é" = C3 A9 -> merge ("Ã", "©")). A lead byte is always followed by its own continuation bytes, so
  these merges never reach across two characters, and every known character encodes to exactly one id.

Ids follow the sorted order of the characters (as in nanoGPT's ``prepare.py``), then the special tokens,
then the partial byte sequences that multi-byte characters need as merge steps (never produced by
``encode`` for valid text). A character absent from the training text is dropped when encoding, as HF
``tokenizers`` does for bytes missing from a BPE vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from scratchlm.errors import DataError
from scratchlm.tokenizer import BYTE_TO_UNICODE, Tokenizer


def _byte_level(data: bytes) -> str:
    return "".join(BYTE_TO_UNICODE[b] for b in data)


def train_char_tokenizer(texts: Iterable[str], special_tokens: Sequence[str] = (),
                         eos_token: str | None = None) -> Tokenizer:
    """One token per distinct character of ``texts``; ``special_tokens`` follow the characters.

    Args:
        texts: the training text (any iterable of strings; each is read once).
        special_tokens: e.g. ["<|endoftext|>"]; ids are assigned after the characters.
        eos_token: one of ``special_tokens`` to mark as end-of-sequence (default: none).
    """
    chars: set[str] = set()
    for text in texts:
        chars.update(text)
    if not chars:
        raise DataError("cannot build a character tokenizer from empty text: give a corpus with some text")
    ordered = sorted(chars)
    vocab: dict[str, int] = {}
    for ch in ordered:
        vocab[_byte_level(ch.encode("utf-8"))] = len(vocab)
    specials = {tok: len(vocab) + i for i, tok in enumerate(special_tokens)}
    next_id = len(vocab) + len(specials)

    merges: list[tuple[str, str]] = []
    seen_merges: set[tuple[str, str]] = set()
    for ch in ordered:
        data = ch.encode("utf-8")
        if len(data) == 1:
            continue
        # Build the character left to right: (b0, b1) -> b0b1, (b0b1, b2) -> b0b1b2, ...
        for i in range(1, len(data)):
            left, right = _byte_level(data[:i]), _byte_level(data[i:i + 1])
            for part in (left, right):
                if part not in vocab:
                    vocab[part] = next_id
                    next_id += 1
            if (left, right) not in seen_merges:
                seen_merges.add((left, right))
                merges.append((left, right))
    if eos_token is not None and eos_token not in specials:
        raise DataError(f"eos_token {eos_token!r} must be one of the special tokens {list(specials)}")
    return Tokenizer(vocab, merges, specials, pretokenizer="gpt2", eos_token=eos_token)
