"""Reading SentencePiece ``.model`` files: the protobuf wire format and the precompiled normalisation map.

A ``.model`` file is one serialised ``ModelProto`` message (sentencepiece's ``sentencepiece_model.proto``).
Protobuf's wire format is simple enough to read by hand: a message is a run of fields, each a *key* varint
``(field_number << 3) | wire_type`` followed by the value, where wire type 0 is a varint, 1 eight fixed bytes,
2 a length-prefixed byte string (strings and nested messages), 5 four fixed bytes (a ``float``). Fields we do
not use are skipped, so files from newer sentencepiece versions still load. No pickles, no generated code.

The normaliser rules (``nmt_nfkc``, ``nfkc``, ``nmt_nfkc_cf`` ...) travel inside the file as a
*precompiled charsmap*: ``<trie size: uint32 LE><Darts-clone double-array trie><NUL-separated outputs>``.
The trie maps UTF-8 byte strings to offsets into the outputs; normalising takes the longest match at each
position (``PrecompiledCharsMap.longest_match``), which is what sentencepiece's ``normalizer.cc`` does.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from scratchlm.errors import ModelFileError

# ModelProto.SentencePiece.Type
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
# TrainerSpec.ModelType
MODEL_TYPES = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}


def read_varint(data: bytes, pos: int) -> tuple[int, int]:
    """The varint at ``data[pos:]`` (7 bits a byte, least significant first) and the position after it."""
    result = shift = 0
    while True:
        if pos >= len(data):
            raise ModelFileError("the SentencePiece model file ends inside a number; it is truncated or corrupt")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def read_fields(data: bytes) -> list[tuple[int, int | bytes]]:
    """The (field number, value) pairs of one protobuf message, in file order.

    Varints come back as ints; length-delimited values and fixed32/fixed64 values as raw bytes.
    """
    fields: list[tuple[int, int | bytes]] = []
    pos = 0
    while pos < len(data):
        key, pos = read_varint(data, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, pos = read_varint(data, pos)
        elif wire_type in (1, 5):
            size = 8 if wire_type == 1 else 4
            value, pos = data[pos:pos + size], pos + size
        elif wire_type == 2:
            size, pos = read_varint(data, pos)
            value, pos = data[pos:pos + size], pos + size
        else:  # groups (3, 4) are not used by sentencepiece_model.proto
            raise ModelFileError(f"unexpected protobuf wire type {wire_type}: this is not a SentencePiece model file")
        if pos > len(data):
            raise ModelFileError("the SentencePiece model file ends inside a field; it is truncated or corrupt")
        fields.append((number, value))
    return fields


def _int32(value: int) -> int:
    """A varint read as protobuf's int32 (negative numbers are written as 64-bit two's complement)."""
    return value - (1 << 64) if value >= 1 << 63 else value


@dataclass
class SentencePieceModel:
    """The parts of a ``ModelProto`` a tokenizer needs (defaults as in sentencepiece_model.proto)."""

    pieces: list[tuple[str, float, int]]  # (piece, score, type)
    model_type: str = "unigram"
    byte_fallback: bool = False
    unk_surface: str = " \u2047 "
    treat_whitespace_as_suffix: bool = False
    normalizer_name: str = ""
    precompiled_charsmap: bytes = b""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True
    trainer: dict = field(default_factory=dict)  # other TrainerSpec values by field number, for reference


def parse_model(data: bytes) -> SentencePieceModel:
    """Parse the bytes of a SentencePiece ``.model`` file."""
    pieces: list[tuple[str, float, int]] = []
    trainer: dict[int, int | bytes] = {}
    normalizer: dict[int, int | bytes] = {}
    try:
        for number, value in read_fields(data):
            if number == 1 and isinstance(value, bytes):  # repeated SentencePiece pieces
                piece, score, kind = "", 0.0, NORMAL
                for n, v in read_fields(value):
                    if n == 1 and isinstance(v, bytes):
                        piece = v.decode("utf-8")
                    elif n == 2 and isinstance(v, bytes):
                        score = struct.unpack("<f", v)[0]
                    elif n == 3 and isinstance(v, int):
                        kind = v
                pieces.append((piece, score, kind))
            elif number == 2 and isinstance(value, bytes):
                trainer = dict(read_fields(value))
            elif number == 3 and isinstance(value, bytes):
                normalizer = dict(read_fields(value))
    except UnicodeDecodeError:
        raise ModelFileError("a piece of the SentencePiece model is not valid UTF-8; the file is corrupt") from None
    if not pieces:
        raise ModelFileError("the file holds no pieces: it is not a SentencePiece model file")
    if not trainer and not normalizer:  # sentencepiece always writes both, after the pieces
        raise ModelFileError("the SentencePiece model file has no trainer or normalizer settings; it is truncated")

    def flag(spec: dict, number: int, default: bool) -> bool:
        return bool(spec.get(number, default))

    def text(spec: dict, number: int, default: str) -> str:
        value = spec.get(number)
        return value.decode("utf-8") if isinstance(value, bytes) else default

    model_type = trainer.get(3, 1)
    return SentencePieceModel(
        pieces=pieces,
        model_type=MODEL_TYPES.get(model_type if isinstance(model_type, int) else 1, str(model_type)),
        byte_fallback=flag(trainer, 35, False),
        unk_surface=text(trainer, 44, " \u2047 "),
        treat_whitespace_as_suffix=flag(trainer, 24, False),
        normalizer_name=text(normalizer, 1, ""),
        precompiled_charsmap=normalizer.get(2, b"") if isinstance(normalizer.get(2, b""), bytes) else b"",
        add_dummy_prefix=flag(normalizer, 3, True),
        remove_extra_whitespaces=flag(normalizer, 4, True),
        escape_whitespaces=flag(normalizer, 5, True),
        trainer={n: (_int32(v) if isinstance(v, int) else v) for n, v in trainer.items()},
    )


class PrecompiledCharsMap:
    """sentencepiece's compiled normalisation rules: a Darts-clone double-array trie over UTF-8 bytes.

    Each 32-bit trie unit packs a label (the byte that leads into it), an offset to its children and a
    has-leaf bit; a leaf unit's value is an offset into the NUL-separated replacement strings. The unit
    layout is darts-clone's ``DoubleArrayUnit`` (darts.h).
    """

    def __init__(self, blob: bytes):
        if len(blob) <= 4:
            raise ModelFileError("the SentencePiece normaliser rules (precompiled_charsmap) are truncated")
        trie_size = struct.unpack_from("<I", blob)[0]
        if trie_size >= len(blob) or trie_size % 4:
            raise ModelFileError("the SentencePiece normaliser rules (precompiled_charsmap) are corrupt")
        self.units = struct.unpack_from(f"<{trie_size // 4}I", blob, 4)
        self.outputs = blob[4 + trie_size:]

    def starts_rule(self, data: bytes) -> bool:
        """Whether some rule's key begins with ``data`` (a quick test that lets most characters skip the trie)."""
        units = self.units
        node = (units[0] >> 10) << ((units[0] & (1 << 9)) >> 6)
        for byte in data:
            node ^= byte
            if node >= len(units) or units[node] & ((1 << 31) | 0xFF) != byte:
                return False
            unit = units[node]
            node ^= (unit >> 10) << ((unit & (1 << 9)) >> 6)
        return True

    def longest_match(self, data: bytes, start: int) -> tuple[int, bytes] | None:
        """(length in bytes, replacement) of the longest rule matching ``data[start:]``, or None."""
        units = self.units
        unit = units[0]
        node = (unit >> 10) << ((unit & (1 << 9)) >> 6)  # offset of the root's children
        best = None
        for i in range(start, len(data)):
            byte = data[i]
            node ^= byte
            if node >= len(units):
                break
            unit = units[node]
            if unit & ((1 << 31) | 0xFF) != byte:  # label mismatch: no rule continues with this byte
                break
            node ^= (unit >> 10) << ((unit & (1 << 9)) >> 6)
            if (unit >> 8) & 1:  # has a leaf: a rule ends here
                value = units[node] & ((1 << 31) - 1)
                end = self.outputs.find(b"\0", value)
                if end < 0:
                    end = len(self.outputs)
                best = (i + 1 - start, self.outputs[value:end])
        return best
