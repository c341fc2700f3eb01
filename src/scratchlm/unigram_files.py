"""Reading and writing Unigram tokenizers: SentencePiece ``.model`` files and HF ``tokenizer.json``.

    from scratchlm.unigram import Unigram
    tok = Unigram.from_file("spiece.model")        # or a tokenizer.json, or a directory holding either
    tok.save("tokenizer.json")                     # HF tokenizers loads it and encodes identically

The functions here do the work behind those methods. A ``.model`` is a protobuf (``ModelProto``, parsed by
``scratchlm.sentencepiece_model`` without the protobuf library): pieces with scores and types, the normaliser's
settings and its precompiled rules, and trainer settings such as the BOS/EOS pieces. A ``tokenizer.json`` with a
Unigram model holds the pieces and scores under ``model.vocab`` and the normaliser, pre-tokenizer and decoder as
JSON. Each source gets the normaliser of its own library (``scratchlm.unigram_normalize``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from scratchlm.errors import ModelFileError, UnsupportedError
from scratchlm.files import atomic_write_bytes, read_json
from scratchlm.sentencepiece_model import CONTROL, NORMAL, UNKNOWN, USER_DEFINED, parse_model
from scratchlm.unigram_normalize import HFNormalizer, SentencePieceNormalizer

if TYPE_CHECKING:
    from scratchlm.unigram import Unigram

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "sentencepiece.model")  # looked for in a dir


def read_sentencepiece(path: str | os.PathLike) -> Unigram:
    """A Unigram tokenizer from a SentencePiece ``.model`` file (``tokenizer.model``, ``spiece.model``)."""
    from scratchlm.unigram import Unigram

    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ModelFileError(f"SentencePiece model {path} does not exist") from None
    except OSError as e:
        raise ModelFileError(f"cannot read SentencePiece model {path}: {e}") from None
    model = parse_model(data)
    if model.model_type != "unigram":
        raise UnsupportedError(f"{path} is a SentencePiece {model.model_type!r} model; only unigram models are "
                               "supported (Llama 1/2's tokenizer.model is 'bpe': load its tokenizer.json)")
    if model.treat_whitespace_as_suffix:
        raise UnsupportedError(f"{path}: treat_whitespace_as_suffix=true is not supported")
    user_defined = [p for p, _, t in model.pieces if t == USER_DEFINED]
    normalizer = SentencePieceNormalizer(model.precompiled_charsmap, model.add_dummy_prefix,
                                         model.remove_extra_whitespaces, model.escape_whitespaces, user_defined)
    control = [p for p, _, t in model.pieces if t == CONTROL]
    bos = model.trainer.get(46, b"<s>")  # TrainerSpec fields 46 and 47: bos_piece, eos_piece
    eos = model.trainer.get(47, b"</s>")
    bos, eos = (t.decode() if isinstance(t, bytes) else t for t in (bos, eos))
    return Unigram(model.pieces, normalizer, model.byte_fallback, model.unk_surface,
                   bos_token=bos if bos in control else None, eos_token=eos if eos in control else None)


def read_tokenizer_json(path: str | os.PathLike) -> Unigram:
    """A Unigram tokenizer from an HF ``tokenizer.json`` whose model is Unigram."""
    from scratchlm.unigram import Unigram

    spec = read_json(Path(path))
    try:
        model = spec["model"]
        if model.get("type") != "Unigram":
            raise UnsupportedError(f"{path}: tokenizer model {model.get('type')!r} is not Unigram")
        added = {t["content"]: t["id"] for t in spec.get("added_tokens") or []}
        unk_id = model.get("unk_id")
        if unk_id is None:
            raise UnsupportedError(f"{path}: a Unigram model without unk_id is not supported")
        pieces = []
        for i, (piece, score) in enumerate(model["vocab"]):
            kind = UNKNOWN if i == unk_id else CONTROL if added.get(piece) == i else NORMAL
            pieces.append((piece, float(score), kind))
        normalizer = HFNormalizer(spec.get("normalizer"), spec.get("pre_tokenizer"), spec.get("decoder"))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ModelFileError(f"tokenizer file {path} is malformed ({type(e).__name__}: {e})") from None
    # tokenizer.json does not name BOS/EOS (tokenizer_config.json does): take SentencePiece's usual ones
    return Unigram(pieces, normalizer, bool(model.get("byte_fallback")), special_tokens=added,
                   bos_token="<s>" if "<s>" in added else None, eos_token="</s>" if "</s>" in added else None)


def read_unigram(path: str | os.PathLike) -> Unigram:
    """A Unigram tokenizer from a ``tokenizer.json``, a SentencePiece ``.model``, or a directory holding one."""
    path = Path(path)
    if path.is_dir():
        for name in TOKENIZER_FILES:
            if (path / name).is_file():
                return read_unigram(path / name)
        raise ModelFileError(f"{path} holds no tokenizer.json, tokenizer.model or spiece.model")
    if path.suffix == ".json":
        return read_tokenizer_json(path)
    return read_sentencepiece(path)


def write_tokenizer_json(tokenizer: Unigram, path: str | os.PathLike) -> None:
    """Write ``tokenizer`` as an HF ``tokenizer.json`` (Unigram model) that HF tokenizers loads and encodes
    identically (atomically). Only tokenizers with HF's semantics (trained here, or read from a tokenizer.json)
    can be written: a ``.model``'s sentencepiece normaliser has no exact tokenizer.json equivalent."""
    normalizer = tokenizer.normalizer
    if not isinstance(normalizer, HFNormalizer):
        raise UnsupportedError("a tokenizer loaded from a SentencePiece .model cannot be saved as tokenizer.json; "
                               "copy the .model file instead")
    spec = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [
            {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
            for t, i in sorted(tokenizer.special_tokens.items(), key=lambda item: item[1])
        ],
        "normalizer": normalizer.spec["normalizer"],
        "pre_tokenizer": normalizer.spec["pre_tokenizer"],
        "post_processor": None,
        "decoder": normalizer.spec["decoder"],
        "model": {"type": "Unigram", "unk_id": tokenizer.unk_id, "byte_fallback": tokenizer.byte_fallback,
                  "vocab": [[p, s] for p, s, _ in tokenizer.pieces]},
    }
    atomic_write_bytes(Path(path), json.dumps(spec, ensure_ascii=False).encode("utf-8"))


def is_unigram_tokenizer_json(path: str | os.PathLike) -> bool:
    """Whether a tokenizer.json holds a Unigram model (read cheaply: only the model's type is needed)."""
    try:
        spec = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(spec, dict) and isinstance(spec.get("model"), dict) and spec["model"].get("type") == "Unigram"
