"""Byte-level BPE tokenizer, GPT-2 style.

Text becomes ids in four steps (the byte-level pieces are in `scratchlm.bpe_pretokenize`):

1. split out special tokens (``<|im_end|>``) with one regex of their escaped texts, longest first;
2. pre-tokenize the text between them with a regex (GPT-2's, SmolLM2's digit-splitting variant, or GPT-4's);
3. map each pre-token's UTF-8 bytes to printable characters (GPT-2's ``bytes_to_unicode``), so a vocabulary
   of strings such as ``"Ġthe"`` (``Ġ`` is the space byte) can cover every byte sequence;
4. apply the BPE merges to each pre-token, lowest rank first (Sennrich et al. 2016; Radford et al. 2019).

Decoding maps the characters back to bytes and decodes UTF-8 with ``errors="replace"``. Results match
Hugging Face ``tokenizers`` with the same vocabulary, merges and pre-tokenizer; ``tests/test_tokenizer.py``
checks that on SmolLM2's real vocabulary.
"""

from __future__ import annotations

import codecs
import json
import os
from pathlib import Path
from typing import Any

import regex

from scratchlm.bpe_pretokenize import (
    BYTE_TO_UNICODE,
    GPT2_PATTERN,
    GPT4_PATTERN,
    PRETOKENIZER_PATTERNS,
    PRETOKENIZER_REGEXES,
    SMOLLM_PATTERN,
    UNICODE_TO_BYTE,
    bpe,
    bytes_to_unicode,
    pretokenize,
    to_byte_level,
    token_bytes,
)
from scratchlm.errors import ConfigError, ModelFileError, UnsupportedError
from scratchlm.files import atomic_write_bytes

# Re-exported: the byte-level pieces live in bpe_pretokenize.py, but other modules import them from here.
__all__ = [
    "BYTE_TO_UNICODE", "GGUF_PRE_TOKENIZERS", "GPT2_PATTERN", "GPT4_PATTERN", "PRETOKENIZER_PATTERNS",
    "SMOLLM_PATTERN", "UNICODE_TO_BYTE", "StreamDecoder", "Tokenizer", "bpe", "bytes_to_unicode", "pretokenize",
    "to_byte_level", "token_bytes",
]

# GGUF `tokenizer.ggml.pre` names (llama.cpp's) that one of our pre-tokenizers reproduces exactly.
# "gpt-2" is the name llama.cpp writes for GPT-2's regex; "dbrx" runs the GPT-4 (cl100k) regex (see
# formats/export_gguf.py). "default" is read as GPT-2's regex, as HF transformers' GGUF loader reads it;
# llama.cpp's "default" also splits off punctuation runs and numbers first, so it may disagree on those.
GGUF_PRE_TOKENIZERS = {"default": "gpt2", "gpt2": "gpt2", "gpt-2": "gpt2", "smollm": "smollm", "dbrx": "gpt4"}

# GGUF `tokenizer.ggml.token_type` values (llama.cpp's llama_token_type) that mark special tokens.
GGUF_TOKEN_TYPE_CONTROL = 3
GGUF_TOKEN_TYPE_USER_DEFINED = 4

# Pre-tokens cached per tokenizer; past this many the cache starts over, which bounds memory on text with
# endless distinct words (hex dumps, base64) while keeping the hit rate high on natural text.
WORD_CACHE_SIZE = 100_000


class Tokenizer:
    """A byte-level BPE tokenizer.

    Args:
        vocab: byte-level token strings (GPT-2 alphabet, e.g. "Ġthe") to ids.
        merges: BPE merges in rank order, e.g. [("Ġ", "t"), ("h", "e"), ...].
        special_tokens: special token text (e.g. "<|im_end|>") to id; these share the id space with `vocab`.
        pretokenizer: "gpt2", "smollm" or "gpt4" (see PRETOKENIZER_PATTERNS).
        bos_token, eos_token: texts of the begin/end-of-sequence tokens, if the model has them.
    """

    def __init__(
        self,
        vocab: dict[str, int],
        merges: list[tuple[str, str]],
        special_tokens: dict[str, int],
        pretokenizer: str = "gpt2",
        bos_token: str | None = None,
        eos_token: str | None = None,
    ):
        if pretokenizer not in PRETOKENIZER_PATTERNS:
            raise ConfigError(
                f"unknown pre-tokenizer {pretokenizer!r}; choose one of {sorted(PRETOKENIZER_PATTERNS)}"
            )
        if "" in special_tokens:
            raise ConfigError("a special token cannot be the empty string")
        self.vocab = dict(vocab)
        self.merges = [tuple(m) for m in merges]
        self.special_tokens = dict(special_tokens)
        self.pretokenizer = pretokenizer

        # Specials are looked up last-wins, so their text maps to their id even where `vocab` also holds it.
        self._token_to_id = {**self.vocab, **self.special_tokens}
        self._id_to_token = {i: t for t, i in self._token_to_id.items()}
        # Each token's bytes, filled in as tokens are decoded (``bytes_of``): all 49,152 of SmolLM2's up front were
        # a third of building the tokenizer, at every start-up.
        self._id_to_bytes: dict[int, bytes] = {}
        self._special_ids = set(self.special_tokens.values())
        self._vocab_size = max(self._id_to_token, default=-1) + 1

        known = self._token_to_id
        for rank, (left, right) in enumerate(self.merges):
            if left not in known or right not in known or left + right not in known:
                part = next(p for p in (left, right, left + right) if p not in known)
                raise ModelFileError(
                    f"tokenizer merge #{rank} {left!r} + {right!r} uses {part!r}, which is not in the "
                    "vocabulary; the tokenizer file is inconsistent or corrupt"
                )
        # A merge listed twice keeps its last rank, as in GPT-2's encoder.py and HF tokenizers.
        self._ranks = {pair: rank for rank, pair in enumerate(self.merges)}
        # Byte characters with no token (SmolLM2 lacks 21 of the 256): dropped before merging, as HF's BPE does.
        self._missing_bytes = {c for c in BYTE_TO_UNICODE.values() if c not in self.vocab}

        self._split = PRETOKENIZER_REGEXES[pretokenizer]
        self._special_patterns: dict[frozenset[str], regex.Pattern] = {}
        self._cache: dict[str, list[int]] = {}
        self.bos_token = bos_token
        self.eos_token = eos_token
        for name, token in (("bos_token", bos_token), ("eos_token", eos_token)):
            if token is not None and token not in self._token_to_id:
                raise ConfigError(f"{name} {token!r} is not in the tokenizer's vocabulary")

    # ---- ids and tokens -------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Size of the id space: the largest id plus one."""
        return self._vocab_size

    def token_to_id(self, token: str) -> int | None:
        """The id of a vocabulary string or special token text, or None."""
        return self._token_to_id.get(token)

    def id_to_token(self, i: int) -> str | None:
        """The vocabulary string or special token text of an id, or None."""
        return self._id_to_token.get(i)

    @property
    def bos_id(self) -> int | None:
        """Id of `bos_token`, or None."""
        return None if self.bos_token is None else self._token_to_id.get(self.bos_token)

    @bos_id.setter
    def bos_id(self, i: int | None) -> None:
        self.bos_token = self._token_for_id(i, "bos")

    @property
    def eos_id(self) -> int | None:
        """Id of `eos_token`, or None."""
        return None if self.eos_token is None else self._token_to_id.get(self.eos_token)

    @eos_id.setter
    def eos_id(self, i: int | None) -> None:
        self.eos_token = self._token_for_id(i, "eos")

    def _token_for_id(self, i: int | None, what: str) -> str | None:
        if i is None:
            return None
        if i not in self._id_to_token:
            raise ConfigError(f"{what} id {i} is not in the tokenizer's vocabulary (size {self.vocab_size})")
        return self._id_to_token[i]

    # ---- encoding -------------------------------------------------------------------------------------

    def _encode_pretoken(self, pretoken: str) -> list[int]:
        # A byte missing from the vocabulary is dropped before merging, as HF's BPE does when it has no unk
        # token, so its neighbours may merge with each other.
        word = to_byte_level(pretoken)
        if self._missing_bytes and not self._missing_bytes.isdisjoint(word):
            word = "".join(c for c in word if c not in self._missing_bytes)
        return [self._token_to_id[t] for t in bpe(word, self._ranks) if t in self._token_to_id]

    def _encode_ordinary(self, text: str) -> list[int]:
        """Encode text in which no special token is recognised."""
        ids: list[int] = []
        cache = self._cache
        for pretoken in self._split.findall(text):
            pretoken_ids = cache.get(pretoken)
            if pretoken_ids is None:
                if len(cache) >= WORD_CACHE_SIZE:
                    cache.clear()
                pretoken_ids = cache[pretoken] = self._encode_pretoken(pretoken)
            ids.extend(pretoken_ids)
        return ids

    def _special_pattern(self, allowed_special: str | set[str]) -> regex.Pattern | None:
        allowed = allowed_specials(allowed_special, self.special_tokens)
        if not allowed:
            return None
        if allowed not in self._special_patterns:
            # Longest first: at each position the first alternative that matches wins, so this gives HF's
            # leftmost-longest match when one special token is a prefix of another.
            texts = sorted(allowed, key=len, reverse=True)
            self._special_patterns[allowed] = regex.compile("|".join(regex.escape(t) for t in texts))
        return self._special_patterns[allowed]

    def encode(self, text: str, allowed_special: str | set[str] = "all") -> list[int]:
        """Encode text to ids. No BOS/EOS is added.

        Args:
            allowed_special: which special token texts in `text` become their ids: "all", "none" (they are
                encoded as ordinary text), or a set of special token texts.
        """
        special = self._special_pattern(allowed_special)
        if special is None:
            return self._encode_ordinary(text)
        ids: list[int] = []
        start = 0
        for match in special.finditer(text):
            ids += self._encode_ordinary(text[start : match.start()])
            ids.append(self.special_tokens[match.group()])
            start = match.end()
        ids += self._encode_ordinary(text[start:])
        return ids

    # ---- decoding -------------------------------------------------------------------------------------

    def bytes_of(self, token_id: int, skip_special: bool = False) -> bytes:
        """The raw bytes of one token, even when they are only part of a UTF-8 character (OpenAI's logprobs
        report them). Ids with no token (padding rows of a larger embedding) give b"", as in HF."""
        if skip_special and token_id in self._special_ids:
            return b""
        data = self._id_to_bytes.get(token_id)
        if data is None:
            token = self._id_to_token.get(token_id)
            if token is None:
                return b""
            data = self._id_to_bytes[token_id] = token_bytes(token)
        return data

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        """Decode ids to text; invalid UTF-8 (e.g. half an emoji) becomes U+FFFD."""
        data = b"".join(self.bytes_of(i, skip_special) for i in ids)
        return data.decode("utf-8", errors="replace")

    def stream_decoder(self, skip_special: bool = True) -> StreamDecoder:
        """A decoder for ids that arrive one at a time, as during generation."""
        return StreamDecoder(self, skip_special)

    # ---- files ----------------------------------------------------------------------------------------

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any]) -> Tokenizer:
        """Build the tokenizer stored in a GGUF file's metadata (keys "tokenizer.ggml.*", as plain values)."""

        def get(key: str) -> Any:
            if key not in meta:
                raise ModelFileError(f"GGUF metadata has no {key!r}; the file has no usable tokenizer")
            return meta[key]

        model = get("tokenizer.ggml.model")
        if model != "gpt2":
            raise UnsupportedError(f"GGUF tokenizer model {model!r} is not supported; only 'gpt2' (byte-level BPE) is")
        pre = meta.get("tokenizer.ggml.pre", "default")
        if pre not in GGUF_PRE_TOKENIZERS:
            raise UnsupportedError(
                f"GGUF pre-tokenizer {pre!r} is not supported; supported: {sorted(GGUF_PRE_TOKENIZERS)}"
            )
        tokens = list(get("tokenizer.ggml.tokens"))
        types = list(meta.get("tokenizer.ggml.token_type", [1] * len(tokens)))
        if len(types) != len(tokens):
            raise ModelFileError(f"GGUF tokenizer has {len(tokens)} tokens but {len(types)} token types")
        special_types = (GGUF_TOKEN_TYPE_CONTROL, GGUF_TOKEN_TYPE_USER_DEFINED)
        vocab = {t: i for i, (t, k) in enumerate(zip(tokens, types)) if k not in special_types}
        special_tokens = {tokens[i]: i for i, k in enumerate(types) if k in special_types}
        lines = get("tokenizer.ggml.merges")
        merges = [tuple(line.split(" ")) for line in lines]
        for line, parts in zip(lines, merges):
            if len(parts) != 2:
                raise ModelFileError(f"GGUF tokenizer merge {line!r} is not two tokens separated by one space")

        def token_at(key: str) -> str | None:
            i = meta.get(key)
            if i is None:
                return None
            if not 0 <= i < len(tokens):
                raise ModelFileError(f"GGUF {key} = {i} is outside the vocabulary of {len(tokens)} tokens")
            return tokens[i]

        return cls(
            vocab,
            merges,
            special_tokens,
            pretokenizer=GGUF_PRE_TOKENIZERS[pre],
            bos_token=token_at("tokenizer.ggml.bos_token_id"),
            eos_token=token_at("tokenizer.ggml.eos_token_id"),
        )

    @classmethod
    def from_file(
        cls, path: str | os.PathLike, bos_token: str | None = None, eos_token: str | None = None
    ) -> Tokenizer:
        """Load a Hugging Face tokenizer.json holding a byte-level BPE model.

        tokenizer.json does not say which tokens are BOS/EOS (tokenizer_config.json does): pass them here or
        set `bos_token`/`eos_token` afterwards.
        """
        path = Path(path)
        try:
            spec = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ModelFileError(f"tokenizer file {path} does not exist") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelFileError(f"cannot read tokenizer file {path}: {e}") from None
        try:
            return cls._from_hf_spec(spec, bos_token, eos_token)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ModelFileError(f"tokenizer file {path} is malformed ({type(e).__name__}: {e})") from None

    @classmethod
    def _from_hf_spec(cls, spec: dict, bos_token: str | None, eos_token: str | None) -> Tokenizer:
        model = spec["model"]
        if model.get("type") != "BPE":
            raise UnsupportedError(f"tokenizer model type {model.get('type')!r} is not supported; only BPE is")
        for option in ("dropout", "continuing_subword_prefix", "end_of_word_suffix"):
            if model.get(option):
                raise UnsupportedError(f"BPE option {option}={model[option]!r} is not supported")
        for option in ("byte_fallback", "ignore_merges"):
            if model.get(option):
                raise UnsupportedError(f"BPE option {option}=true is not supported")
        if spec.get("normalizer"):
            raise UnsupportedError(f"tokenizer normalizer {spec['normalizer'].get('type')!r} is not supported")
        pretokenizer = _pretokenizer_name(spec.get("pre_tokenizer"))

        # HF lists every added token (special or not) in `added_tokens`; all are matched in text before
        # pre-tokenization, so all become our special tokens.
        special_tokens = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
        vocab = {t: i for t, i in model["vocab"].items() if special_tokens.get(t) != i}
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        if any(len(m) != 2 for m in merges):
            raise ModelFileError("a BPE merge is not a pair of tokens")
        return cls(vocab, merges, special_tokens, pretokenizer, bos_token=bos_token, eos_token=eos_token)

    def save(self, path: str | os.PathLike) -> None:
        """Write a Hugging Face tokenizer.json that `tokenizers.Tokenizer.from_file` loads and encodes identically."""
        byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
        if self.pretokenizer == "gpt2":
            pre_tokenizer: dict = byte_level
        elif self.pretokenizer == "smollm":
            digits = {"type": "Digits", "individual_digits": True}
            pre_tokenizer = {"type": "Sequence", "pretokenizers": [digits, byte_level]}
        else:
            split = {"type": "Split", "pattern": {"Regex": GPT4_PATTERN}, "behavior": "Isolated", "invert": False}
            pre_tokenizer = {"type": "Sequence", "pretokenizers": [split, {**byte_level, "use_regex": False}]}
        spec = {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": [
                {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                 "normalized": False, "special": True}
                for t, i in sorted(self.special_tokens.items(), key=lambda item: item[1])
            ],
            "normalizer": None,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": None,
            "decoder": {**byte_level, "add_prefix_space": True},
            "model": {
                "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                # Real tokenizer.json files list the special tokens in the model's vocab too.
                "vocab": dict(sorted(self._token_to_id.items(), key=lambda item: item[1])),
                "merges": [list(m) for m in self.merges],
            },
        }
        # One line, as json's fast C encoder writes it; HF's own files are indented but parse the same.
        atomic_write_bytes(Path(path), json.dumps(spec, ensure_ascii=False).encode("utf-8"))


def _pretokenizer_name(pre: dict | None) -> str:
    """Our pre-tokenizer name for an HF tokenizer.json `pre_tokenizer`, or UnsupportedError."""

    def is_byte_level(p: dict, use_regex: bool) -> bool:
        return (p.get("type") == "ByteLevel" and not p.get("add_prefix_space", True)
                and p.get("use_regex", True) == use_regex)

    if pre is None:
        pre = {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if len(steps) == 1 and is_byte_level(steps[0], use_regex=True):
        return "gpt2"
    if len(steps) == 2:
        first, second = steps
        if first == {"type": "Digits", "individual_digits": True} and is_byte_level(second, use_regex=True):
            return "smollm"
        if (first.get("type") == "Split" and first.get("pattern") == {"Regex": GPT4_PATTERN}
                and first.get("behavior") == "Isolated" and not first.get("invert")
                and is_byte_level(second, use_regex=False)):
            return "gpt4"
    raise UnsupportedError(
        f"tokenizer pre_tokenizer {json.dumps(pre)[:300]} is not one scratchlm reproduces "
        "(ByteLevel; Digits + ByteLevel; GPT-4 Split + ByteLevel)"
    )



def allowed_specials(allowed_special: str | set[str], special_tokens: dict[str, int]) -> frozenset[str]:
    """The special token texts that ``encode(text, allowed_special=...)`` turns into their ids: "all", "none" or a
    set of special token texts (each must be one)."""
    if allowed_special == "all":
        return frozenset(special_tokens)
    if allowed_special == "none":
        return frozenset()
    if isinstance(allowed_special, (set, frozenset)):
        allowed = frozenset(allowed_special)
        unknown = allowed - special_tokens.keys()
        if unknown:
            raise ConfigError(f"allowed_special names tokens that are not special tokens: {sorted(unknown)}")
        return allowed
    raise ConfigError(f"allowed_special must be 'all', 'none' or a set of special tokens, not {allowed_special!r}")


class StreamDecoder:
    """Turns ids arriving one at a time into text, never emitting half a UTF-8 character.

    Bytes of an incomplete character are held back until the character completes (or proves invalid, when
    it becomes U+FFFD exactly as in `Tokenizer.decode`), so that the pushed pieces plus `flush()` always
    equal `tokenizer.decode(ids, skip_special)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True):
        self._tokenizer = tokenizer
        self._skip_special = skip_special
        # The stdlib incremental UTF-8 decoder holds back exactly the trailing bytes that could still start
        # a valid character, and replaces invalid bytes the same way a one-shot decode does.
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes (possibly "")."""
        return self._utf8.decode(self._tokenizer.bytes_of(token_id, self._skip_special))

    def flush(self) -> str:
        """Return what is still held back (as U+FFFD: it is an incomplete character) and start afresh."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text
