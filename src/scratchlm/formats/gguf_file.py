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
Tensors come back as the `gguf` package's ``ReaderTensor`` records (same fields, same ``data`` views as its
reader makes), so the rest of scratchlm does not care which reader opened the file.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np

# value type -> (struct format, size) for the scalar types; 8 is a string, 9 an array
_SCALARS = {0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4), 6: ("<f", 4),
            7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8)}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9


class GGUFFile:
    """An opened GGUF file: ``metadata`` (key -> Python value), ``tensors`` (``ReaderTensor`` records whose
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
                return [self._string() for _ in range(count)]
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

    def _tensor_info(self) -> tuple[str, list[int], int, int]:
        name = self._string()
        n_dims = self._scalar(4)
        dims = [self._scalar(10) for _ in range(n_dims)]
        return name, dims, self._scalar(4), self._scalar(10)

    def _tensors(self, infos, start: int) -> list:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
        from gguf.gguf_reader import ReaderTensor
        from gguf.quants import quant_shape_to_byte_shape

        plain = {GGMLQuantizationType.F16: np.float16, GGMLQuantizationType.F32: np.float32,
                 GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8,
                 GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32,
                 GGMLQuantizationType.I64: np.int64}
        tensors, seen = [], set()
        for name, dims, raw_type, offset in infos:
            if name in seen:
                raise ValueError(f"tensor {name} appears twice")
            seen.add(name)
            kind = GGMLQuantizationType(raw_type)
            n_elems = int(np.prod(dims)) if dims else 1
            block, type_size = GGML_QUANT_SIZES[kind]
            n_bytes = n_elems * type_size // block
            shape = tuple(reversed(dims))
            if kind in plain:
                dtype, count = np.dtype(plain[kind]), n_elems
            else:  # block-quantized: raw bytes, one row of blocks per row
                dtype, count, shape = np.dtype(np.uint8), n_bytes, quant_shape_to_byte_shape(shape, kind)
            at = start + offset
            if at + count * dtype.itemsize > len(self._data):
                raise ValueError(f"tensor {name} runs past the end of the file (truncated?)")
            data = np.ndarray((count,), dtype=dtype, buffer=self._data, offset=at).reshape(shape)
            tensors.append(ReaderTensor(name=name, tensor_type=kind, shape=np.array(dims, dtype=np.uint64),
                                        n_elements=n_elems, n_bytes=n_bytes, data_offset=at, data=data,
                                        field=None))
        return tensors
