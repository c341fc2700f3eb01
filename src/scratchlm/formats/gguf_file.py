"""A lean reader of the GGUF container: header, metadata and tensor table, with tensor data mapped from the file.

The `gguf` package's ``GGUFReader`` builds a numpy view for every part of every metadata value; SmolLM2's
vocabulary and merges are ~150,000 strings, and that took 5-11 s of every start-up (measured on the 2-core
machine, most of ``LLM.load``). This reader walks the same layout with ``struct`` over the mapped bytes and
returns plain Python values, which is all the loader needs: a few hundred milliseconds for the same file.

The layout (llama.cpp's docs/gguf.md, version 2 and 3, little-endian):

    magic "GGUF" | u32 version | u64 tensor count | u64 metadata count
    metadata:  string key | u32 value type | value            (arrays: u32 item type | u64 count | items)
    tensors:   string name | u32 n_dims | u64 dims[n_dims] | u32 ggml type | u64 offset in the data section
    padding to ``general.alignment`` (default 32), then the data section

Strings are a u64 byte length and UTF-8 bytes. Tensor dims list the fastest-moving dimension first.
Tensors come back as ``GGUFTensor`` records with the fields and ``data`` views of the `gguf` package's
``ReaderTensor`` (its ``tensor_type`` compares equal to gguf's ``GGMLQuantizationType``), so the rest of scratchlm
does not care which reader opened the file. Nothing here imports the `gguf` package: that import alone (it pulls
in its writer, yaml and metadata code) cost 0.15 s of CPU of every start-up.
"""

from __future__ import annotations

import enum
import struct
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

# value type -> (struct format, size) for the scalar types; 8 is a string, 9 an array
_SCALARS = {0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4), 6: ("<f", 4),
            7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8)}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9
_U64 = struct.Struct("<Q")

# ggml's tensor types: id -> (name, values per block, bytes per block), as in ggml.h and ggml.c's type traits
# (the same table as the gguf package's GGMLQuantizationType and GGML_QUANT_SIZES).
GGML_TYPES = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40), 10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
}
GGMLType = enum.IntEnum("GGMLType", {name: i for i, (name, _, _) in GGML_TYPES.items()})
# types stored as plain numbers (one value per element); the others are blocks of bytes
_PLAIN = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8, "I16": np.int16,
          "I32": np.int32, "I64": np.int64}


class GGUFTensor(NamedTuple):
    """One tensor of the file: ``data`` is a read-only view of the mapped bytes, [rows, bytes per row] uint8
    for block-quantized types; ``shape`` lists the dims as the file does (fastest-moving first)."""

    name: str
    tensor_type: GGMLType
    shape: np.ndarray
    n_elements: int
    n_bytes: int
    data_offset: int
    data: np.ndarray
    field: None = None


def _ggml_type(raw: int) -> tuple[GGMLType, int, int]:
    """(type, values per block, bytes per block) of a ggml type id; a newer id than this table knows is looked up
    in the gguf package (imported only then)."""
    if raw in GGML_TYPES:
        _, block, size = GGML_TYPES[raw]
        return GGMLType(raw), block, size
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        kind = GGMLQuantizationType(raw)
    except ValueError:
        raise ValueError(f"unknown ggml tensor type {raw}") from None
    block, size = GGML_QUANT_SIZES[kind]
    return kind, block, size


class GGUFFile:
    """An opened GGUF file: ``metadata`` (key -> Python value), ``tensors`` (``GGUFTensor`` records whose
    ``data`` are read-only numpy views of the mapped file) and ``version``. Raises ValueError on a malformed
    file; the caller turns it into a user-facing error."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._data = np.memmap(self.path, dtype=np.uint8, mode="r")
        self._buf = memoryview(self._data)
        self._pos = 0
        magic = bytes(self._buf[:4])
        if magic != b"GGUF":
            raise ValueError(f"not a GGUF file (magic {magic!r}, expected b'GGUF')")
        self._pos = 4
        self.version = self._scalar(4)
        if self.version not in (2, 3):
            raise ValueError(f"GGUF version {self.version} is not supported (2 and 3 are; big-endian files are not)")
        n_tensors, n_meta = self._scalar(10), self._scalar(10)
        self.metadata: dict[str, Any] = {}
        for _ in range(n_meta):
            key = self._string()
            self.metadata[key] = self._value(self._scalar(4))
        infos = [self._tensor_info() for _ in range(n_tensors)]
        alignment = int(self.metadata.get("general.alignment", 32))
        if alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"general.alignment {alignment} is not a power of two")
        start = -(-self._pos // alignment) * alignment
        self.tensors = self._tensors(infos, start)

    # -- the byte walk ----------------------------------------------------------------------------------------
    def _scalar(self, kind: int):
        fmt, size = _SCALARS[kind]
        if self._pos + size > len(self._buf):
            raise ValueError("the file ends inside its metadata (truncated?)")
        (value,) = struct.unpack_from(fmt, self._buf, self._pos)
        self._pos += size
        return value

    def _string(self) -> str:
        n = self._scalar(10)
        end = self._pos + n
        if end > len(self._buf):
            raise ValueError("the file ends inside a string (truncated?)")
        text = str(self._buf[self._pos:end], "utf-8")
        self._pos = end
        return text

    def _value(self, kind: int):
        if kind == _STRING:
            return self._string()
        if kind == _ARRAY:
            item, count = self._scalar(4), self._scalar(10)
            if item == _STRING:
                return self._strings(count)
            if item == _ARRAY:
                return [self._value(_ARRAY) for _ in range(count)]
            if item not in _NUMPY:
                raise ValueError(f"unknown GGUF array item type {item}")
            dtype = np.dtype(_NUMPY[item]).newbyteorder("<")
            end = self._pos + count * dtype.itemsize
            if end > len(self._buf):
                raise ValueError("the file ends inside an array (truncated?)")
            values = np.frombuffer(self._buf, dtype=dtype, count=count, offset=self._pos).tolist()
            self._pos = end
            return values
        if kind not in _SCALARS:
            raise ValueError(f"unknown GGUF value type {kind}")
        return self._scalar(kind)

    def _strings(self, count: int) -> list[str]:
        """``count`` strings in a row: the vocabulary and merges (SmolLM2: 98,000), in one tight loop (half the
        time of ``_string`` per item)."""
        buf, pos, size, unpack = self._buf, self._pos, len(self._buf), _U64.unpack_from
        out: list[str] = []
        append = out.append
        for _ in range(count):
            if pos + 8 > size:
                raise ValueError("the file ends inside its metadata (truncated?)")
            end = pos + 8 + unpack(buf, pos)[0]
            if end > size:
                raise ValueError("the file ends inside a string (truncated?)")
            append(str(buf[pos + 8 : end], "utf-8"))
            pos = end
        self._pos = pos
        return out

    def _tensor_info(self) -> tuple[str, list[int], int, int]:
        name = self._string()
        n_dims = self._scalar(4)
        dims = [self._scalar(10) for _ in range(n_dims)]
        return name, dims, self._scalar(4), self._scalar(10)

    def _tensors(self, infos, start: int) -> list[GGUFTensor]:
        tensors, seen = [], set()
        for name, dims, raw_type, offset in infos:
            if name in seen:
                raise ValueError(f"tensor {name} appears twice")
            seen.add(name)
            kind, block, type_size = _ggml_type(raw_type)
            n_elems = int(np.prod(dims)) if dims else 1
            n_bytes = n_elems * type_size // block
            shape = tuple(reversed(dims))
            if kind.name in _PLAIN:
                dtype, count = np.dtype(_PLAIN[kind.name]), n_elems
            else:  # block-quantized (and BF16, as gguf reads it): raw bytes, one row of blocks per row
                if shape and shape[-1] % block:
                    raise ValueError(f"tensor {name}: rows of {shape[-1]} values do not fill {kind.name} blocks of "
                                     f"{block}")
                dtype, count = np.dtype(np.uint8), n_bytes
                shape = (*shape[:-1], shape[-1] // block * type_size) if shape else (n_bytes,)
            at = start + offset
            if at + count * dtype.itemsize > len(self._data):
                raise ValueError(f"tensor {name} runs past the end of the file (truncated?)")
            data = np.ndarray((count,), dtype=dtype, buffer=self._data, offset=at).reshape(shape)
            tensors.append(GGUFTensor(name=name, tensor_type=kind, shape=np.array(dims, dtype=np.uint64),
                                      n_elements=n_elems, n_bytes=n_bytes, data_offset=at, data=data))
        return tensors
