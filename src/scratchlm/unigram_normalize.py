"""Text normalisation for the Unigram tokenizer: what happens to a text before the Viterbi search cuts it.

Two pipelines, one per file format ``scratchlm.unigram.Unigram`` reads, each reproducing its library exactly:

- ``SentencePieceNormalizer`` (a SentencePiece ``.model``): sentencepiece's ``Normalizer``. The model file's
  *precompiled charsmap* (rewrite rules such as NFKC folding, read by ``scratchlm.sentencepiece_model``'s
  ``PrecompiledCharsMap``) is applied by longest match; leading, trailing and repeated spaces are dropped; a space
  is added at the start (the *dummy prefix*, so "world" and "hello world" share "▁world"); and every space is
  written as ``▁`` (U+2581), which makes spaces ordinary characters that pieces can hold.
- ``HFNormalizer`` (an HF ``tokenizer.json``): HF tokenizers' normalizers (NFC/NFD/NFKC/NFKD, Lowercase,
  Precompiled, Replace, Prepend, Strip, Sequence), then the Metaspace pre-tokenizer, which splits the text into
  words before each ``▁``; it also reads the decoder's settings back (``decoder_strips``).

``tests/test_unigram.py`` checks both against the libraries through the tokenizer's ids.
"""

from __future__ import annotations

import base64
import unicodedata

import regex

from scratchlm.errors import UnsupportedError
from scratchlm.sentencepiece_model import PrecompiledCharsMap

SPACE = "\u2581"  # "▁", SentencePiece's visible space


class SentencePieceNormalizer:
    """sentencepiece's ``Normalizer``: rules from the charsmap, whitespace trimmed and escaped as ``▁``."""

    def __init__(self, charsmap: bytes = b"", add_dummy_prefix: bool = True, remove_extra_whitespaces: bool = True,
                 escape_whitespaces: bool = True, user_defined: list[str] | tuple[str, ...] = ()):
        self.trie = PrecompiledCharsMap(charsmap) if charsmap else None
        self.add_dummy_prefix = add_dummy_prefix
        self.remove_extra_whitespaces = remove_extra_whitespaces
        self.escape_whitespaces = escape_whitespaces
        self.user_defined = sorted(set(user_defined), key=len, reverse=True)
        self._user_re = regex.compile("|".join(map(regex.escape, self.user_defined))) if self.user_defined else None
        self._plain: dict[str, bool] = {}  # character -> no rule starts with it

    def _prefix(self, text: str, i: int) -> tuple[str, int]:
        """The normalised form of the longest rule (or user-defined piece, or single character) at ``text[i]``,
        and how many characters it consumes (sentencepiece's ``NormalizePrefix``)."""
        if self._user_re is not None:
            match = self._user_re.match(text, i)
            if match:
                return match.group(), match.end() - i
        c = text[i]
        if self.trie is None:
            return c, 1
        plain = self._plain.get(c)
        if plain is None:
            plain = self._plain[c] = not self.trie.starts_rule(c.encode("utf-8", "surrogatepass"))
        if plain:
            return c, 1
        window = text[i:i + 32].encode("utf-8", "surrogatepass")
        match = self.trie.longest_match(window, 0)
        if match is None:
            return c, 1
        length, replacement = match
        return replacement.decode("utf-8", "replace"), len(window[:length].decode("utf-8", "surrogatepass"))

    def __call__(self, text: str, dummy_prefix: bool = True) -> str:
        i, n = 0, len(text)
        if self.remove_extra_whitespaces:  # leading whitespace (as normalised) is dropped
            while i < n:
                piece, used = self._prefix(text, i)
                if piece != " ":
                    break
                i += used
        if i >= n:
            return ""
        space = SPACE if self.escape_whitespaces else " "
        out = [space] if self.add_dummy_prefix and dummy_prefix else []
        prev_space = self.remove_extra_whitespaces
        while i < n:
            piece, used = self._prefix(text, i)
            if prev_space:
                piece = piece.lstrip(" ")
            if piece:
                out.append(piece.replace(" ", space) if self.escape_whitespaces else piece)
                prev_space = piece.endswith(" ")
            i += used
            if not self.remove_extra_whitespaces:
                prev_space = False
        normalized = "".join(out)
        if self.remove_extra_whitespaces:
            normalized = normalized.rstrip(space)
        return normalized


class HFNormalizer:
    """An HF tokenizers normalizer + Metaspace pre-tokenizer pipeline, from tokenizer.json's JSON."""

    UNICODE_FORMS = {"NFC", "NFD", "NFKC", "NFKD"}

    def __init__(self, normalizer: dict | None, pre_tokenizer: dict | None, decoder: dict | None = None):
        self.spec = {"normalizer": normalizer, "pre_tokenizer": pre_tokenizer, "decoder": decoder}
        self.steps = self._flatten(normalizer)
        pre = pre_tokenizer or {}
        if pre.get("type") == "Sequence" and len(pre.get("pretokenizers", [])) == 1:
            pre = pre["pretokenizers"][0]
        if pre and pre.get("type") != "Metaspace":
            raise UnsupportedError(f"Unigram pre_tokenizer {pre.get('type')!r} is not supported (Metaspace or none)")
        self.metaspace = bool(pre)
        self.replacement = pre.get("replacement", SPACE)
        scheme = pre.get("prepend_scheme")
        if scheme is None:  # tokenizers < 0.14 wrote add_prefix_space instead
            scheme = "always" if pre.get("add_prefix_space", True) else "never"
        self.prepend_scheme = scheme
        self.split = bool(pre.get("split", True))
        self._split_re = regex.compile(f"(?={regex.escape(self.replacement)})")

    def _flatten(self, spec: dict | None) -> list[tuple]:
        if not spec:
            return []
        kind = spec.get("type")
        if kind == "Sequence":
            return [step for s in spec.get("normalizers", []) for step in self._flatten(s)]
        if kind in self.UNICODE_FORMS:
            return [(kind,)]
        if kind == "Lowercase":
            return [("lower",)]
        if kind == "Precompiled":
            blob = base64.b64decode(spec.get("precompiled_charsmap") or "")
            return [("charsmap", PrecompiledCharsMap(blob))] if blob else []
        if kind == "Replace":
            pattern = spec["pattern"]
            compiled = regex.compile(pattern["Regex"] if "Regex" in pattern else regex.escape(pattern["String"]))
            return [("replace", compiled, spec["content"])]
        if kind == "Prepend":
            return [("prepend", spec["prepend"])]
        if kind == "Strip":
            return [("strip", spec.get("strip_left", True), spec.get("strip_right", True))]
        raise UnsupportedError(f"tokenizer normalizer {kind!r} is not supported for Unigram models")

    def normalize(self, text: str) -> str:
        for step in self.steps:
            if step[0] in self.UNICODE_FORMS:
                text = unicodedata.normalize(step[0], text)
            elif step[0] == "lower":
                text = text.lower()
            elif step[0] == "charsmap":
                text = _apply_charsmap(step[1], text)
            elif step[0] == "replace":
                text = step[1].sub(lambda _m, s=step[2]: s, text)
            elif step[0] == "prepend":
                text = step[1] + text if text else text
            elif step[0] == "strip":
                text = text.lstrip() if step[1] else text
                text = text.rstrip() if step[2] else text
        return text

    def decoder_strips(self) -> tuple[bool, tuple[int, int]]:
        """From the tokenizer.json decoder: whether the first token loses its leading ``▁`` (Metaspace), and
        how many spaces come off the start and end of the decoded text (Strip)."""
        decoder = self.spec.get("decoder") or {}
        steps = decoder.get("decoders", []) if decoder.get("type") == "Sequence" else [decoder]
        first, left, right = False, 0, 0
        for step in steps:
            if step.get("type") == "Metaspace":
                scheme = step.get("prepend_scheme") or ("always" if step.get("add_prefix_space", True) else "never")
                first = scheme != "never"
            elif step.get("type") == "Strip" and step.get("content", " ") == " ":
                left, right = int(step.get("start", 0)), int(step.get("stop", 0))
        return first, (left, right)

    def words(self, text: str, first: bool) -> list[str]:
        """Normalise one stretch of text (between special tokens) and split it as the pre-tokenizer does."""
        text = self.normalize(text)
        if not self.metaspace:
            return [text] if text else []
        text = text.replace(" ", self.replacement)
        prepend = self.prepend_scheme == "always" or (self.prepend_scheme == "first" and first)
        if prepend and text and not text.startswith(self.replacement):
            text = self.replacement + text
        if not self.split:
            return [text] if text else []
        return [w for w in self._split_re.split(text) if w]


def _apply_charsmap(trie: PrecompiledCharsMap, text: str) -> str:
    """Longest-match rewriting with a precompiled charsmap (no whitespace handling)."""
    out, i = [], 0
    data_cache: dict[str, bool] = {}
    while i < len(text):
        c = text[i]
        if c not in data_cache:
            data_cache[c] = trie.starts_rule(c.encode("utf-8", "surrogatepass"))
        match = trie.longest_match(text[i:i + 32].encode("utf-8", "surrogatepass"), 0) if data_cache[c] else None
        if match is None:
            out.append(c)
            i += 1
        else:
            window = text[i:i + 32].encode("utf-8", "surrogatepass")
            out.append(match[1].decode("utf-8", "replace"))
            i += len(window[:match[0]].decode("utf-8", "surrogatepass"))
    return "".join(out)
