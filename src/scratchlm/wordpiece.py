"""WordPiece: BERT's subword tokenizer (Schuster & Nakajima 2012; Devlin et al. 2018), written here.

BPE (``scratchlm.tokenizer``) learns merges and applies them in order; WordPiece keeps only a vocabulary and
cuts each word greedily, longest match first. Encoding a text takes four steps:

1. **special tokens** (``[CLS]``, ``[SEP]``, ...) written in the text are found first and kept whole;
2. **normalise** (BERT's normaliser): drop control characters, turn whitespace into spaces, put spaces around
   CJK ideographs (each one becomes a word), strip accents (NFD, then drop the combining marks), lower-case;
3. **pre-tokenise**: split on whitespace, and make every punctuation character a word of its own;
4. **WordPiece** each word: take the longest vocabulary entry that starts the word, then the longest
   ``##``-prefixed entry that continues it, and so on; a word that cannot be covered, or that is longer than
   ``max_input_chars_per_word`` characters, becomes ``[UNK]`` as a whole.

``encode`` then wraps the ids as BERT expects them: ``[CLS] ids [SEP]``. The character classes follow HF
``tokenizers`` (its Rust ``BertNormalizer`` and ``BertPreTokenizer``), the reference the tests compare with.
"""

from __future__ import annotations

import functools
import re
import sys
import unicodedata
from pathlib import Path

from scratchlm.errors import ModelFileError, UnsupportedError
from scratchlm.files import read_json

# CJK Unified Ideographs and their extensions, as HF tokenizers' BertNormalizer lists them.
CJK_RANGES = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
              (0x2B920, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))
# Unicode's White_Space property (what Rust's char::is_whitespace tests); Python's str.isspace differs.
WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a" \
             "\u2028\u2029\u202f\u205f\u3000"
SPECIAL_NAMES = ("unk", "cls", "sep", "pad", "mask")
_CLEANUP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
            (" do not", " don't"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def _char_class(codepoints: list[int]) -> str:
    """A regex character class body ("a-z...") for sorted code points, runs written as ranges."""
    parts, i = [], 0
    while i < len(codepoints):
        j = i
        while j + 1 < len(codepoints) and codepoints[j + 1] == codepoints[j] + 1:
            j += 1
        lo, hi = re.escape(chr(codepoints[i])), re.escape(chr(codepoints[j]))
        parts.append(lo if i == j else f"{lo}-{hi}")
        i = j + 1
    return "".join(parts)


@functools.cache
def _patterns() -> dict[str, re.Pattern]:
    """The character classes, built once from ``unicodedata`` (one pass over every code point, ~0.5 s)."""
    removed, punct, marks = [0], [], []
    for cp in range(1, sys.maxunicode + 1):
        category = unicodedata.category(chr(cp))
        # control, format, private use and surrogates are dropped (not unassigned ones), except \t \n \r
        if category in ("Cc", "Cf", "Co", "Cs") and cp not in (9, 10, 13) or cp == 0xFFFD:
            removed.append(cp)
        # punctuation: the P* categories, and all of ASCII's ($, +, <, ... are symbols in Unicode)
        elif category[0] == "P" or 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
            punct.append(cp)
        elif category == "Mn":
            marks.append(cp)
    space = re.escape(WHITESPACE)
    cjk = "".join(f"{re.escape(chr(a))}-{re.escape(chr(b))}" for a, b in CJK_RANGES)
    return {
        "removed": re.compile(f"[{_char_class(removed)}]+"),
        "space": re.compile(f"[{space}]"),
        "cjk": re.compile(f"[{cjk}]"),
        "mark": re.compile(f"[{_char_class(marks)}]+"),
        # a word is one punctuation character, or a run of characters that are neither space nor punctuation
        "word": re.compile(f"[{_char_class(punct)}]|[^{_char_class(punct)}{space}]+"),
    }


class WordPiece:
    """A WordPiece vocabulary with BERT's normaliser and pre-tokenizer.

    ``encode(text)`` -> ids with ``[CLS]``/``[SEP]``; ``decode(ids)`` -> text; ``tokenize(text)`` -> the
    subword strings. Load one with ``WordPiece.from_file`` (``tokenizer.json`` or ``vocab.txt``).
    """

    def __init__(self, vocab: dict[str, int], *, unk_token: str = "[UNK]", cls_token: str = "[CLS]",
                 sep_token: str = "[SEP]", pad_token: str = "[PAD]", mask_token: str = "[MASK]",
                 continuing_prefix: str = "##", max_input_chars_per_word: int = 100, lowercase: bool = True,
                 strip_accents: bool | None = None, clean_text: bool = True, handle_chinese_chars: bool = True,
                 special_tokens: list[str] | None = None):
        for token in (unk_token, cls_token, sep_token):
            if token not in vocab:
                raise ModelFileError(f"WordPiece vocabulary has no {token!r} token")
        self.vocab = vocab
        self.id_to_token = {i: t for t, i in vocab.items()}
        self.unk_token, self.cls_token, self.sep_token = unk_token, cls_token, sep_token
        self.pad_token, self.mask_token = pad_token, mask_token
        self.unk_id, self.cls_id, self.sep_id = vocab[unk_token], vocab[cls_token], vocab[sep_token]
        self.pad_id = vocab.get(pad_token, 0)
        self.continuing_prefix = continuing_prefix
        self.max_input_chars_per_word = max_input_chars_per_word
        self.lowercase = lowercase
        # BERT's rule: accents are stripped when unspecified and lower-casing (the "uncased" models)
        self.strip_accents = lowercase if strip_accents is None else strip_accents
        self.clean_text = clean_text
        self.handle_chinese_chars = handle_chinese_chars
        if special_tokens is None:
            special_tokens = [t for t in (unk_token, cls_token, sep_token, pad_token, mask_token) if t in vocab]
        self.special_tokens = {t: vocab[t] for t in special_tokens}
        # longest first, so that a special token that contains another one wins
        alternatives = sorted(self.special_tokens, key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, alternatives))) if alternatives else None
        self._word_cache: dict[str, list[int]] = {}

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    # ----------------------------------------------------------------------------------------------
    def normalize(self, text: str) -> str:
        """BERT's normaliser, in HF tokenizers' order: clean, space out CJK, strip accents, lower-case."""
        p = _patterns()
        if self.clean_text:
            text = p["space"].sub(" ", p["removed"].sub("", text))
        if self.handle_chinese_chars:
            text = p["cjk"].sub(r" \g<0> ", text)
        if self.strip_accents:
            text = p["mark"].sub("", unicodedata.normalize("NFD", text))
        if self.lowercase:
            # Character by character, as HF does: str.lower() alone would pick the final-sigma form (ς) at
            # the end of a word, so map capital sigma first.
            text = text.replace("\u03a3", "\u03c3").lower()
        return text

    def pre_tokenize(self, text: str) -> list[str]:
        """Words: whitespace-separated runs, with every punctuation character a word of its own."""
        return _patterns()["word"].findall(text)

    def word_ids(self, word: str) -> list[int]:
        """WordPiece one word: greedy longest match first, ``##`` on continuations, [UNK] if it cannot."""
        cached = self._word_cache.get(word)
        if cached is not None:
            return cached
        ids: list[int] = []
        start = 0
        while start < len(word) and len(word) <= self.max_input_chars_per_word:
            end = len(word)
            while end > start:
                piece = word[start:end] if start == 0 else self.continuing_prefix + word[start:end]
                if piece in self.vocab:
                    break
                end -= 1
            else:  # no entry covers this position: the whole word is unknown
                ids = []
                break
            ids.append(self.vocab[piece])
            start = end
        if not ids:  # too long, or not covered
            ids = [self.unk_id]
        if len(self._word_cache) > 200_000:
            self._word_cache.clear()
        self._word_cache[word] = ids
        return ids

    def encode_ordinary(self, text: str) -> list[int]:
        """The ids of a text without special-token handling or [CLS]/[SEP]."""
        ids: list[int] = []
        for word in self.pre_tokenize(self.normalize(text)):
            ids.extend(self.word_ids(word))
        return ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The ids of ``text``: special tokens written in it kept whole, wrapped in [CLS] ... [SEP].

        Nothing is truncated here: ``len(encode(text))`` is the number of positions the text needs in the model.
        """
        ids: list[int] = []
        pos = 0
        if self._special_re is not None:
            for match in self._special_re.finditer(text):
                ids.extend(self.encode_ordinary(text[pos:match.start()]))
                ids.append(self.special_tokens[match.group()])
                pos = match.end()
        ids.extend(self.encode_ordinary(text[pos:]))
        return self.with_special_tokens(ids) if add_special_tokens else ids

    def with_special_tokens(self, ids: list[int], max_length: int | None = None) -> list[int]:
        """``[CLS] ids [SEP]``, the content cut so that the whole is at most ``max_length`` ids (if given)."""
        if max_length is not None:
            ids = ids[: max(0, max_length - 2)]
        return [self.cls_id, *ids, self.sep_id]

    def tokenize(self, text: str) -> list[str]:
        """The subword strings of ``text`` (no [CLS]/[SEP])."""
        return [self.id_to_token[i] for i in self.encode(text, add_special_tokens=False)]

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        """Text from ids: ``##`` pieces glued to the previous one, spaces before punctuation removed.

        Lower-casing and accent stripping cannot be undone: the result is the normalised text.
        """
        specials = set(self.special_tokens.values())
        out: list[str] = []
        for i in ids:
            if skip_special and i in specials:
                continue
            token = self.id_to_token.get(int(i), self.unk_token)
            if token.startswith(self.continuing_prefix) and out:
                piece = token[len(self.continuing_prefix):]
            else:
                piece = (" " if out else "") + token
            # HF's WordPiece decoder "cleanup", token by token: drop the space that pre-tokenisation put
            # before punctuation (" ." -> "."); the multi-token patterns of its list never match a single token.
            for dirty, clean in _CLEANUP:
                piece = piece.replace(dirty, clean)
            out.append(piece)
        return "".join(out)

    # ----------------------------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | Path) -> WordPiece:
        """Load a ``tokenizer.json`` (HF tokenizers, WordPiece model) or a BERT ``vocab.txt``.

        Given a directory, use its ``tokenizer.json``, else its ``vocab.txt`` (with ``tokenizer_config.json``).
        """
        path = Path(path)
        if path.is_dir():
            if (path / "tokenizer.json").is_file():
                return cls.from_tokenizer_json(path / "tokenizer.json")
            if (path / "vocab.txt").is_file():
                config = path / "tokenizer_config.json"
                return cls.from_vocab_txt(path / "vocab.txt", read_json(config) if config.is_file() else {})
            raise ModelFileError(f"{path} has neither tokenizer.json nor vocab.txt")
        if not path.is_file():
            raise ModelFileError(f"no such tokenizer file: {path}")
        if path.suffix == ".json":
            return cls.from_tokenizer_json(path)
        return cls.from_vocab_txt(path)

    @classmethod
    def from_vocab_txt(cls, path: str | Path, tokenizer_config: dict | None = None) -> WordPiece:
        """A BERT ``vocab.txt``: one token per line, the line number is the id."""
        config = tokenizer_config or {}
        try:
            lines = Path(path).read_text(encoding="utf-8").split("\n")
        except (OSError, UnicodeDecodeError) as exc:
            raise ModelFileError(f"cannot read {path}: {exc}") from None
        if lines and lines[-1] == "":
            lines.pop()
        vocab: dict[str, int] = {}
        for i, token in enumerate(lines):
            vocab.setdefault(token.rstrip("\r"), i)
        tokens = {f"{n}_token": config[f"{n}_token"] for n in SPECIAL_NAMES
                  if isinstance(config.get(f"{n}_token"), str)}
        return cls(vocab, lowercase=bool(config.get("do_lower_case", True)),
                   strip_accents=config.get("strip_accents"),
                   handle_chinese_chars=bool(config.get("tokenize_chinese_chars", True)), **tokens)

    @classmethod
    def from_tokenizer_json(cls, path: str | Path) -> WordPiece:
        """An HF ``tokenizer.json`` whose model is WordPiece with BERT's normaliser and pre-tokenizer."""
        data = read_json(Path(path))
        model = data.get("model") or {}
        if model.get("type") != "WordPiece":
            raise UnsupportedError(f"{path}: tokenizer model {model.get('type')!r} is not WordPiece")
        norm = data.get("normalizer") or {}
        if norm and norm.get("type") != "BertNormalizer":
            raise UnsupportedError(f"{path}: normalizer {norm.get('type')!r} is not supported (BertNormalizer)")
        pre = data.get("pre_tokenizer") or {}
        if pre.get("type") != "BertPreTokenizer":
            raise UnsupportedError(f"{path}: pre-tokenizer {pre.get('type')!r} is not supported (BertPreTokenizer)")
        specials = [t["content"] for t in data.get("added_tokens", [])]
        post = data.get("post_processor") or {}
        cls_token, sep_token = "[CLS]", "[SEP]"
        if post.get("type") == "BertProcessing":
            cls_token, sep_token = post["cls"][0], post["sep"][0]
        elif post.get("type") == "TemplateProcessing":
            single = [p for p in post.get("single", []) if "SpecialToken" in p]
            if len(single) == 2:
                cls_token, sep_token = (p["SpecialToken"]["id"] for p in single)
        return cls(
            dict(model["vocab"]), unk_token=model.get("unk_token", "[UNK]"), cls_token=cls_token,
            sep_token=sep_token, continuing_prefix=model.get("continuing_subword_prefix", "##"),
            max_input_chars_per_word=int(model.get("max_input_chars_per_word", 100)),
            lowercase=bool(norm.get("lowercase", False)) if norm else False,
            strip_accents=norm.get("strip_accents") if norm else False,
            clean_text=bool(norm.get("clean_text", True)) if norm else False,
            handle_chinese_chars=bool(norm.get("handle_chinese_chars", True)) if norm else False,
            special_tokens=specials,
        )
