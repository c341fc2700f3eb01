"""Unigram language-model tokenizer (Kudo 2018), the tokenizer SentencePiece trains for T5, ALBERT, XLNet, mT5.

BPE (``scratchlm.tokenizer``) replays merges; WordPiece (``scratchlm.wordpiece``) cuts greedily. A Unigram
model instead gives every piece a log-probability and picks, among *all* ways to cut the text into pieces,
the one with the highest total: the Viterbi path through the lattice of pieces. Encoding a text:

1. **special tokens** (``<s>``, ``</s>``, added tokens) written in the text are cut out first (if allowed);
2. **normalise**: SentencePiece's rules from the model file (``nmt_nfkc``, ``nfkc``, identity ...: a
   precompiled charsmap, see ``scratchlm.sentencepiece_model``), drop leading/trailing/repeated spaces,
   add the *dummy prefix* (a space at the start, so "world" and "hello world" share "▁world"), and write
   every space as ``▁`` (U+2581), which makes spaces ordinary characters that pieces can hold;
3. **Viterbi**: for every end position keep the best-scoring path that ends there; a position that no
   one-character piece covers gets an ``<unk>`` step scored ``min_score - 10``; follow the back-pointers;
4. **byte fallback**: an unknown character becomes its UTF-8 bytes ``<0x..>`` if the model has them;
   otherwise runs of unknown characters become one ``<unk>``.

Decoding joins the pieces, turns ``▁`` back into spaces, decodes runs of byte pieces as UTF-8 and drops the
dummy prefix's space. Two sources are read: a SentencePiece ``.model`` file, where encoding reproduces
sentencepiece's optimised encoder (``unigram_model.cc``, float32 path scores included, so near-ties break
the same way) and an HF ``tokenizer.json`` with a Unigram model, where it reproduces HF tokenizers
(float64 scores; the Metaspace pre-tokenizer's word split; normalizers NFC/NFD/NFKC/NFKD, Lowercase,
Precompiled, Replace, Prepend, Strip, Sequence). ``tests/test_unigram.py`` checks ids against both libraries.

Beside this module: ``unigram_normalize`` (step 2, both normalisers), ``unigram_files`` (reading ``.model`` and
``tokenizer.json``, writing ``tokenizer.json``), ``unigram_train`` (the trainer), ``sentencepiece_model`` (the
``.model`` protobuf and its precompiled rules).
"""

from __future__ import annotations

import codecs
import os
from array import array

import regex

from scratchlm.errors import ConfigError, ModelFileError
from scratchlm.sentencepiece_model import BYTE, CONTROL, NORMAL, UNKNOWN, USER_DEFINED
from scratchlm.tokenizer import StreamDecoder, allowed_specials
from scratchlm.unigram_files import is_unigram_tokenizer_json
from scratchlm.unigram_normalize import SPACE, HFNormalizer, SentencePieceNormalizer

__all__ = ["SPACE", "UNK_PENALTY", "HFNormalizer", "SentencePieceNormalizer", "Unigram", "is_unigram_tokenizer_json"]

UNK_PENALTY = 10.0  # unk score = min_score - 10 (kUnkPenalty in sentencepiece's unigram_model.cc)
FLT_MIN = 1.17549435e-38  # sentencepiece starts max_score at FLT_MIN, so user-defined pieces score ~ -0.1


def _replace_each_byte(error: UnicodeDecodeError) -> tuple[str, int]:
    # One U+FFFD per invalid byte, as sentencepiece's decoder writes them (Python's "replace" writes one
    # per maximal invalid run).
    return "\ufffd" * (error.end - error.start), error.end


codecs.register_error("scratchlm-each-byte", _replace_each_byte)


class Unigram:
    """A Unigram tokenizer: pieces with log-probability scores, Viterbi segmentation.

    Build one with ``Unigram.from_file`` (a SentencePiece ``.model``, an HF ``tokenizer.json`` with a
    Unigram model, or a directory holding either) or ``scratchlm.unigram_train.train_unigram``. It offers
    the interface ``LLM`` uses of ``Tokenizer`` (encode, decode, bytes_of, stream_decoder, token_to_id,
    id_to_token, vocab_size, bos/eos).

    Args:
        pieces: (piece, score, type) per id; types are sentencepiece's (1 normal, 2 unknown, 3 control,
            4 user-defined, 5 unused, 6 byte).
        normalizer: a ``SentencePieceNormalizer`` (sentencepiece semantics) or ``HFNormalizer`` (HF tokenizers').
        byte_fallback: unknown characters become ``<0x..>`` byte pieces.
        unk_surface: the text ``<unk>`` decodes to.
    """

    def __init__(self, pieces: list[tuple[str, float, int]], normalizer: SentencePieceNormalizer | HFNormalizer,
                 byte_fallback: bool = False, unk_surface: str = " \u2047 ", bos_token: str | None = None,
                 eos_token: str | None = None, special_tokens: dict[str, int] | None = None):
        self.pieces = [(str(p), float(s), int(t)) for p, s, t in pieces]
        self.normalizer = normalizer
        self.byte_fallback = byte_fallback
        self.unk_surface = unk_surface
        self.hf = isinstance(normalizer, HFNormalizer)
        unk = [i for i, (_, _, t) in enumerate(self.pieces) if t == UNKNOWN]
        if len(unk) != 1:
            raise ModelFileError(f"a Unigram model needs exactly one unknown piece, this one has {len(unk)}")
        self.unk_id = unk[0]
        self._id_to_piece = [p for p, _, _ in self.pieces]
        self._piece_to_id: dict[str, int] = {}
        for i, (piece, _, _) in enumerate(self.pieces):
            if self.hf:
                self._piece_to_id[piece] = i  # HF keeps the last id of a repeated piece
            else:
                self._piece_to_id.setdefault(piece, i)
        if special_tokens is None:
            special_tokens = {p: i for i, (p, _, t) in enumerate(self.pieces) if t in (CONTROL, UNKNOWN)}
        self.special_tokens = dict(special_tokens)
        self._special_ids = set(self.special_tokens.values())
        self._special_re: dict[frozenset, regex.Pattern | None] = {}

        # The pieces the lattice may use, and their scores. sentencepiece: normal and user-defined pieces
        # (user-defined ones score len(bytes) * max_score - 0.1 so they always win); min/max over normal
        # ones. HF: every vocabulary entry, min over all. Scores are float32 in sentencepiece, float64 in HF.
        normal = [s for _, s, t in self.pieces if t == NORMAL] or [0.0]
        if self.hf:
            lattice = {i: s for i, (_, s, t) in enumerate(self.pieces)}
            self.min_score = min(s for _, s, _ in self.pieces)
        else:
            max_score = max(FLT_MIN, max(normal))
            lattice = {i: (len(p.encode()) * max_score - 0.1 if t == USER_DEFINED else s)
                       for i, (p, s, t) in enumerate(self.pieces) if t in (NORMAL, USER_DEFINED)}
            self.min_score = min(normal)
        self._lattice_ids = {self._id_to_piece[i]: i for i in sorted(lattice)}
        self._scores = [lattice.get(i, 0.0) for i in range(len(self.pieces))]
        self._max_len = max((len(p) for p in self._lattice_ids), default=1)
        self._prefixes = {p[:k] for p in self._lattice_ids for k in range(1, len(p) + 1)}
        self._byte_ids: dict[int, int] = {}
        for i, (piece, _, t) in enumerate(self.pieces):
            if (t == BYTE or self.hf) and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                try:
                    self._byte_ids.setdefault(int(piece[3:5], 16), i)
                except ValueError:
                    pass
        self._id_to_byte = {i: b for b, i in self._byte_ids.items()}
        if not self.hf:  # sentencepiece decodes only BYTE-typed pieces as bytes
            self._id_to_byte = {i: b for i, b in self._id_to_byte.items() if self.pieces[i][2] == BYTE}
        self._word_cache: dict[str, list[int]] = {}
        self.bos_token, self.eos_token = bos_token, eos_token
        for name, token in (("bos_token", bos_token), ("eos_token", eos_token)):
            if token is not None and token not in self._piece_to_id:
                raise ConfigError(f"{name} {token!r} is not in the tokenizer's vocabulary")

    # ---- ids and pieces -------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """The number of pieces (ids run 0 .. vocab_size - 1)."""
        return len(self.pieces)

    def token_to_id(self, token: str) -> int | None:
        """The id of a piece (e.g. "▁the", "<s>"), or None."""
        return self._piece_to_id.get(token)

    def id_to_token(self, i: int) -> str | None:
        """The piece of an id, or None."""
        return self._id_to_piece[i] if 0 <= i < len(self._id_to_piece) else None

    @property
    def bos_id(self) -> int | None:
        """Id of ``bos_token``, or None."""
        return None if self.bos_token is None else self._piece_to_id.get(self.bos_token)

    @bos_id.setter
    def bos_id(self, i: int | None) -> None:
        self.bos_token = None if i is None else self.id_to_token(i)

    @property
    def eos_id(self) -> int | None:
        """Id of ``eos_token``, or None."""
        return None if self.eos_token is None else self._piece_to_id.get(self.eos_token)

    @eos_id.setter
    def eos_id(self, i: int | None) -> None:
        self.eos_token = None if i is None else self.id_to_token(i)

    # ---- encoding -------------------------------------------------------------------------------------

    def viterbi(self, text: str) -> list[tuple[int, int, int]]:
        """The best segmentation of normalised ``text``: (start, end, id) per piece; id is ``unk_id`` where
        no piece covers a character. Ties keep the first candidate found, scanning starts left to right and
        lengths short to long, exactly as sentencepiece's and HF's optimised encoders do."""
        n = len(text)
        if self.hf:
            best = [0.0] * (n + 1)
        else:
            best = array("f", bytes(4 * (n + 1)))  # float32 sums, rounded as C++ rounds them
        starts = [-1] * (n + 1)
        ids = [0] * (n + 1)
        one = array("f", [0.0]) if not self.hf else None
        scores, lattice_ids, prefixes, max_len = self._scores, self._lattice_ids, self._prefixes, self._max_len
        unk_score = self.min_score - UNK_PENALTY
        if one is not None:
            one[0] = unk_score
            unk_score = one[0]
        for start in range(n):
            till = best[start]
            single = False
            for end in range(start + 1, min(n, start + max_len) + 1):
                piece = text[start:end]
                if piece not in prefixes:
                    break
                i = lattice_ids.get(piece)
                if i is None:
                    continue
                candidate = scores[i] + till
                if one is not None:  # sentencepiece keeps path scores in float32
                    one[0] = candidate
                    candidate = one[0]
                if starts[end] == -1 or candidate > best[end]:
                    best[end], starts[end], ids[end] = candidate, start, i
                if end == start + 1:
                    single = True
            if not single:
                candidate = unk_score + till
                if one is not None:
                    one[0] = candidate
                    candidate = one[0]
                end = start + 1
                if starts[end] == -1 or candidate > best[end]:
                    best[end], starts[end], ids[end] = candidate, start, self.unk_id
        path = []
        end = n
        while end > 0:
            path.append((starts[end], end, ids[end]))
            end = starts[end]
        path.reverse()
        return path

    def _ids_of_normalized(self, text: str) -> list[int]:
        """Ids of normalised text: Viterbi, then unknown runs fused into one ``<unk>`` or split into bytes."""
        out: list[int] = []
        unk_run: list[str] = []

        def flush() -> None:
            if not unk_run:
                return
            data = "".join(unk_run).encode("utf-8", "surrogatepass")
            if self.byte_fallback and all(b in self._byte_ids for b in data):
                out.extend(self._byte_ids[b] for b in data)
            else:
                out.append(self.unk_id)
            unk_run.clear()

        for start, end, i in self.viterbi(text):
            if i == self.unk_id:
                if self.byte_fallback and not self.hf:  # sentencepiece: bytes per unknown piece, no fusing
                    data = text[start:end].encode("utf-8", "surrogatepass")
                    out.extend(self._byte_ids[b] for b in data)
                else:
                    unk_run.append(text[start:end])
                continue
            flush()
            out.append(i)
        flush()
        return out

    def _encode_ordinary(self, text: str, first: bool) -> list[int]:
        if not self.hf:
            normalizer = self.normalizer
            assert isinstance(normalizer, SentencePieceNormalizer)
            return self._ids_of_normalized(normalizer(text, dummy_prefix=first))
        assert isinstance(self.normalizer, HFNormalizer)
        ids: list[int] = []
        cache = self._word_cache
        for word in self.normalizer.words(text, first):
            word_ids = cache.get(word)
            if word_ids is None:
                if len(cache) > 100_000:
                    cache.clear()
                word_ids = cache[word] = self._ids_of_normalized(word)
            ids.extend(word_ids)
        return ids

    def encode(self, text: str, allowed_special: str | set[str] = "all") -> list[int]:
        """Encode text to ids. No BOS/EOS is added.

        Args:
            allowed_special: which special token texts in ``text`` become their ids: "all", "none" (encoded
                as ordinary text, as sentencepiece itself does), or a set of special token texts. With a ``.model``,
                the first stretch of text gets the dummy prefix and later ones (after a special token) do
                not; with a tokenizer.json, each stretch is normalised as HF tokenizers does.
        """
        allowed = allowed_specials(allowed_special, self.special_tokens)
        if allowed not in self._special_re:
            texts = sorted(allowed, key=len, reverse=True)
            self._special_re[allowed] = regex.compile("|".join(map(regex.escape, texts))) if texts else None
        pattern = self._special_re[allowed]
        if pattern is None:
            return self._encode_ordinary(text, True)
        ids: list[int] = []
        start, first = 0, True
        for match in pattern.finditer(text):
            if match.start() > start:
                ids += self._encode_ordinary(text[start:match.start()], first)
                first = False
            ids.append(self.special_tokens[match.group()])
            start = match.end()
        if start < len(text):
            ids += self._encode_ordinary(text[start:], first)
        return ids

    def tokenize(self, text: str) -> list[str]:
        """The pieces of ``text`` (special tokens not recognised)."""
        return [self._id_to_piece[i] for i in self.encode(text, allowed_special="none")]

    # ---- decoding -------------------------------------------------------------------------------------

    def bytes_of(self, token_id: int, skip_special: bool = False) -> bytes:
        """The bytes one id stands for (``▁`` as a space; a byte piece as its byte), b"" for unknown ids."""
        if token_id in self._id_to_byte:
            return bytes([self._id_to_byte[token_id]])
        if not 0 <= token_id < len(self.pieces):
            return b""
        if token_id in self._special_ids:
            if skip_special:
                return b""
            if token_id == self.unk_id:
                return self.unk_surface.encode()
        return self._id_to_piece[token_id].replace(SPACE, " ").encode()

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        """Decode ids as sentencepiece does (from a ``.model``) or HF tokenizers does (from a tokenizer.json).

        Byte pieces in a row are decoded together as UTF-8 (U+FFFD per invalid byte) and ``▁`` becomes a
        space; the space the dummy prefix added is dropped. sentencepiece writes ``<unk>`` as " ⁇ " and
        control pieces (``<s>``) as nothing; here they are written as their text unless ``skip_special``.
        """
        out: list[str] = []
        pending = bytearray()
        if self.hf:
            assert isinstance(self.normalizer, HFNormalizer)
            strip, (strip_left, strip_right) = self.normalizer.decoder_strips()
            remove_extra = False
        else:
            assert isinstance(self.normalizer, SentencePieceNormalizer)
            strip = self.normalizer.add_dummy_prefix or self.normalizer.remove_extra_whitespaces
            remove_extra = self.normalizer.remove_extra_whitespaces
        at_start, stripped, written, emitted = True, False, False, 0
        for i in ids:
            i = int(i)
            if not 0 <= i < len(self.pieces):
                continue
            if i in self._id_to_byte:
                pending.append(self._id_to_byte[i])
                emitted += 1
                continue
            if pending:
                out.append(pending.decode("utf-8", "scratchlm-each-byte"))
                written = written or bool(out[-1])
                pending.clear()
            piece, _, kind = self.pieces[i]
            special = i in self._special_ids or kind == CONTROL
            if self.hf and special and skip_special:
                continue
            # sentencepiece keeps stripping "▁" while nothing has been written (remove_extra_whitespaces);
            # HF's Metaspace decoder strips only the first token.
            if self.hf:
                at_start = emitted == 0
            elif stripped or written:
                at_start = False
            stripped = False
            if i == self.unk_id and not self.hf:
                text = self.unk_surface
            elif special:
                text = "" if skip_special else piece
            else:
                if at_start and strip and piece.startswith(SPACE):
                    piece = piece[1:]
                    stripped = not remove_extra
                text = piece.replace(SPACE, " ")
            emitted += 1
            out.append(text)
            written = written or bool(text)
        if pending:
            out.append(pending.decode("utf-8", "scratchlm-each-byte"))
        text = "".join(out)
        if self.hf:  # HF's Strip decoder (Llama-style tokenizer.json files): spaces off the whole text
            for _ in range(strip_left):
                text = text[1:] if text.startswith(" ") else text
            for _ in range(strip_right):
                text = text[:-1] if text.endswith(" ") else text
        return text

    def stream_decoder(self, skip_special: bool = True) -> StreamDecoder:
        """A decoder for ids that arrive one at a time, as during generation (``▁`` always becomes a space)."""
        return StreamDecoder(self, skip_special)  # type: ignore[arg-type]

    # ---- files (scratchlm.unigram_files does the reading and writing) ---------------------------------

    @classmethod
    def from_sentencepiece(cls, path: str | os.PathLike) -> Unigram:
        """Load a SentencePiece ``.model`` file (``tokenizer.model``, ``spiece.model``) of type unigram."""
        from scratchlm.unigram_files import read_sentencepiece

        return read_sentencepiece(path)

    @classmethod
    def from_tokenizer_json(cls, path: str | os.PathLike) -> Unigram:
        """Load an HF ``tokenizer.json`` whose model is Unigram."""
        from scratchlm.unigram_files import read_tokenizer_json

        return read_tokenizer_json(path)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Unigram:
        """Load a ``tokenizer.json`` (Unigram), a SentencePiece ``.model``, or a directory holding one."""
        from scratchlm.unigram_files import read_unigram

        return read_unigram(path)

    def save(self, path: str | os.PathLike) -> None:
        """Write an HF ``tokenizer.json`` (Unigram model) that HF tokenizers loads and encodes identically.

        Only tokenizers that follow HF's semantics (trained here, or loaded from a tokenizer.json) can be
        saved: a ``.model``'s sentencepiece normaliser has no exact tokenizer.json equivalent.
        """
        from scratchlm.unigram_files import write_tokenizer_json

        write_tokenizer_json(self, path)
